// kv-offload's page store, tiers and prefix ids: content addressing, damage detection, placement
// rules by hand, and a tiered snapshot that every reader gets back exactly.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "helpers.h"
#include "kv/error.h"
#include "kv/offload.h"
#include "kv/page_store.h"
#include "kv/sha256.h"
#include "kv/snapshot_io.h"

namespace {

TEST(PageStore, Sha256MatchesFipsVectorsAndTheFastPathMatchesThePortableOne) {
  EXPECT_EQ(kv::sha256_hex("abc", 3),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(kv::sha256_hex("", 0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(kv::sha256_hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::mt19937 rng(9);
  std::string data(70000, '\0');
  for (char& c : data) c = char(rng());
  for (size_t n : {size_t(1), size_t(55), size_t(56), size_t(63), size_t(64), size_t(65),
                   size_t(119), size_t(128), size_t(4096), size_t(70000)})
    EXPECT_EQ(kv::sha256_hex(data.data(), n), kv::sha256_hex(data.data(), n, true)) << n;
}

TEST(PageStore, PagesAreContentAddressedCheckedAndListedByTheManifest) {
  const std::string dir = kvtest::temp_dir() + "/store";
  const std::string a = "page a bytes", b(5000, 'b');
  std::string id_a, id_b;
  {
    kv::PageStore s(dir, true);
    id_a = s.put(a.data(), a.size(), false);
    id_b = s.put(b.data(), b.size(), true);
    EXPECT_EQ(id_a, kv::sha256_hex(a.data(), a.size()));
    EXPECT_EQ(s.put(a.data(), a.size(), false), id_a);  // stored once
    EXPECT_EQ(s.entries().size(), 2u);
    EXPECT_LT(s.entries().at(id_b).stored, 5000);  // zstd shrank the run of 'b'
    s.commit();
  }
  const kv::PageStore r(dir, false);
  const auto got_a = r.get(id_a), got_b = r.get(id_b);
  EXPECT_EQ(std::string(got_a.begin(), got_a.end()), a);
  EXPECT_EQ(std::string(got_b.begin(), got_b.end()), b);
  // An id the manifest lacks, a missing file, a corrupted file: data errors naming the page.
  EXPECT_EQ(kvtest::exit_code_of([&] { r.get(std::string(64, '0')); }), 65);
  { std::ofstream(dir + "/pages/" + id_a + ".raw", std::ios::binary) << "page A bytes"; }
  try {
    r.get(id_a);
    ADD_FAILURE() << "corrupt page read";
  } catch (const kv::Error& e) {
    EXPECT_NE(std::string(e.what()).find(id_a), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("does not match its id"), std::string::npos);
  }
  std::filesystem::remove(dir + "/pages/" + id_b + ".zst");
  EXPECT_EQ(kvtest::exit_code_of([&] { r.get(id_b); }), 65);
  // A torn manifest is refused; a store without one cannot be read from.
  { std::ofstream(dir + "/manifest.json") << "{\"format\": \"kvtk-page-store\", \"pages\": [{"; }
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::PageStore(dir, false); }), 65);
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::PageStore(kvtest::temp_dir() + "/none", false); }), 65);
  // A store that cannot be created.
  { std::ofstream(kvtest::temp_dir() + "/file") << "x"; }
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::PageStore(kvtest::temp_dir() + "/file/store", true); }),
            73);
}

// Readers share one parsed store per directory until its manifest is replaced.
TEST(PageStore, ReadersShareTheStoreUntilTheManifestChanges) {
  const std::string dir = kvtest::temp_dir() + "/shared_store";
  const std::string a = "first page", b = "second page";
  std::string id_a, id_b;
  {
    kv::PageStore w(dir, true);
    id_a = w.put(a.data(), a.size(), false);
    w.commit();
  }
  const auto first = kv::PageStore::open_for_reading(dir);
  EXPECT_EQ(kv::PageStore::open_for_reading(dir), first);  // not parsed again
  EXPECT_EQ(first->entries().size(), 1u);
  {
    kv::PageStore w(dir, true);
    id_b = w.put(b.data(), b.size(), false);
    w.commit();  // a new manifest.json (renamed into place)
  }
  const auto second = kv::PageStore::open_for_reading(dir);
  EXPECT_NE(second, first);
  ASSERT_EQ(second->entries().size(), 2u);
  const auto got = second->get(id_b);
  EXPECT_EQ(std::string(got.begin(), got.end()), b);
  EXPECT_EQ(first->entries().size(), 1u);  // a holder of the old one keeps what it had
  // A store without a manifest is an error each time, never cached.
  const std::string none = kvtest::temp_dir() + "/no_store";
  for (int i = 0; i < 2; ++i)
    EXPECT_EQ(kvtest::exit_code_of([&] { kv::PageStore::open_for_reading(none); }), 65);
}

TEST(PageStore, TiersParseAndPlacePagesByHeat) {
  EXPECT_EQ(kv::Tier::parse("gpu:2GiB").capacity, int64_t(2) << 30);
  EXPECT_EQ(kv::Tier::parse("host:512M").capacity, 512000000);
  EXPECT_EQ(kv::Tier::parse("disk:/x/y").dir, "/x/y");
  EXPECT_EQ(kv::Tier::parse("disk:/x/y").capacity, -1);
  EXPECT_EQ(kv::Tier::parse("disk:d:1KiB").capacity, 1024);
  for (const char* bad : {"gpu", "gpu:", ":1G", "gpu:lots", "gpu:-1G", "disk:"})
    EXPECT_EQ(kvtest::exit_code_of([&] { kv::Tier::parse(bad); }), 64) << bad;
  // Six pages of 100 bytes: two always kept (first tier), the others by heat.
  std::vector<kv::PlacedPage> pages(6);
  const double heat[6] = {0, 5, 1, 9, 3, 0};
  for (int i = 0; i < 6; ++i) {
    pages[size_t(i)].page = i;
    pages[size_t(i)].bytes = 100;
    pages[size_t(i)].heat = heat[i];
    pages[size_t(i)].always = i == 0 || i == 5;
  }
  const std::vector<kv::Tier> tiers = {kv::Tier::parse("gpu:300"), kv::Tier::parse("host:100"),
                                       kv::Tier::parse("disk:d")};
  kv::place_pages(pages, tiers);
  // gpu: the two always-kept pages and the hottest (3); host: the next (1); disk: 4 and 2.
  const int want[6] = {0, 1, 2, 0, 2, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(pages[size_t(i)].tier, want[i]) << i;
  auto fresh = pages;
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::place_pages(fresh, {kv::Tier::parse("gpu:150")}); }),
            64);
  fresh = pages;
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::place_pages(fresh, {kv::Tier::parse("gpu:400")}); }),
            64);
}

TEST(PageStore, PrefixIdsChainTheTokensOfEachHeadsPages) {
  kv::Snapshot s = kvtest::tiny_snapshot(kv::DType::f16, false, false);  // 6 tokens, full heads
  kv::Header& h = s.header;
  const kv::Layer& l = s.layers[0];
  // Pages of 16 hold a whole head here: one page per head, equal ids (same tokens).
  auto ids = kv::page_prefix_ids(h, l, 16);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids[0], ids[1]);
  std::string block;
  for (int32_t t : h.tokens)
    for (int b = 0; b < 4; ++b) block.push_back(char(uint32_t(t) >> (8 * b)));
  EXPECT_EQ(ids[0], kv::sha256_hex(block.data(), block.size()));
  // Another token changes the id.
  h.tokens[5] += 1;
  EXPECT_NE(kv::page_prefix_ids(h, l, 16)[0], ids[0]);
}

TEST(PageStore, TieredSnapshotsReadBackExactly) {
  for (kv::DType dt : {kv::DType::f16, kv::DType::bf16, kv::DType::f32}) {
    const kv::Snapshot s = kvtest::tiny_snapshot(dt, true, true);  // ragged heads, side data
    const std::string dir = kvtest::temp_dir() + "/tiered";
    kv::PageStore store(dir, true);
    kv::Snapshot paged = s;
    for (kv::Layer& l : paged.layers) {
      int64_t pages = 0;
      for (size_t h = 0; h + 1 < l.head_offsets.size(); ++h)
        pages += (l.head_offsets[h + 1] - l.head_offsets[h] + 15) / 16;
      std::vector<uint8_t> flags(static_cast<size_t>(pages));
      for (size_t i = 0; i < flags.size(); ++i) flags[i] = i % 2;  // every other page on disk
      l.k_stored = std::make_shared<kv::Encoded>(
          kv::page_out(l.k, l.head_offsets, 16, flags, store, true, true));
      l.v_stored = std::make_shared<kv::Encoded>(
          kv::page_out(l.v, l.head_offsets, 16, flags, store, false, false));
    }
    store.commit();
    const std::string path = kvtest::temp_dir() + "/paged.kv.h5";
    kv::write_snapshot(path, paged);
    const kv::Snapshot back = kv::read_snapshot(path);
    for (size_t l = 0; l < s.layers.size(); ++l) {
      EXPECT_TRUE(back.layers[l].k.same_contents(s.layers[l].k)) << l;
      EXPECT_TRUE(back.layers[l].v.same_contents(s.layers[l].v)) << l;
      EXPECT_TRUE(back.layers[l].k_encoding.dense());
    }
  }
}

// An encoded tensor through the store: put_external keeps the encoding's parameters and names one
// object; fetch_external gives the arrays back exactly; a damaged object is a data error naming
// it; and a snapshot whose tensors are external reads back as the encoded one, and keep_stored
// hands over the arrays as they were.
TEST(PageStore, ExternalTensorsComeBackByteForByte) {
  const kv::Snapshot s = kvtest::tiny_snapshot(kv::DType::f16, true, true);
  const std::string dir = kvtest::temp_dir() + "/external";
  kv::PageStore store(dir, true);
  const kv::Layer& l0 = s.layers[0];
  kv::Encoding q8 = kv::default_encoding("q8_0", 'k');
  const kv::RowLayout rows{s.header.model, l0.head_offsets, l0.positions};
  const kv::Encoded coded = kv::encode(q8, l0.k, rows);
  const kv::Encoded ext = kv::put_external(coded, store, true);
  store.commit();
  EXPECT_EQ(ext.encoding.scheme, "external");
  EXPECT_EQ(ext.encoding.inner, "q8_0");
  EXPECT_EQ(ext.encoding.inner_encoding(), coded.encoding);
  ASSERT_EQ(ext.arrays.size(), 1u);
  EXPECT_EQ(ext.arrays[0].bytes.size(), 32u);
  const kv::Encoded back = kv::fetch_external(ext);
  EXPECT_EQ(back.encoding, coded.encoding);
  ASSERT_EQ(back.arrays.size(), coded.arrays.size());
  for (size_t i = 0; i < back.arrays.size(); ++i) {
    EXPECT_EQ(back.arrays[i].name, coded.arrays[i].name);
    EXPECT_EQ(back.arrays[i].type, coded.arrays[i].type);
    EXPECT_EQ(back.arrays[i].bytes, coded.arrays[i].bytes);
  }
  // Objects that are not encoded tensors: a page of other bytes, and a truncated object.
  auto fetch_of = [&](const std::string& bytes) {
    kv::PageStore w(dir, true);
    kv::Encoded e = ext;
    e.arrays[0].bytes.clear();
    kv::PageStore::append_id_bytes(w.put(bytes.data(), bytes.size(), false), e.arrays[0].bytes);
    w.commit();
    try {
      kv::fetch_external(e);
    } catch (const kv::Error& err) {
      return std::pair{int(err.code()), std::string(err.what())};
    }
    return std::pair{0, std::string()};
  };
  const auto other = fetch_of("not an encoded tensor");
  EXPECT_EQ(other.first, 65);
  EXPECT_NE(other.second.find("no KVTKENC1 header"), std::string::npos) << other.second;
  const std::vector<uint8_t> blob =
      store.get(kv::PageStore::id_from_bytes(ext.arrays[0].bytes.data()));
  const auto cut = fetch_of(std::string(blob.begin(), blob.end() - 3));
  EXPECT_EQ(cut.first, 65);
  EXPECT_NE(cut.second.find("truncated"), std::string::npos) << cut.second;
  // Array names become HDF5 dataset names on restore: empty, path-like or repeated ones are bad.
  for (const std::vector<std::string>& names :
       std::vector<std::vector<std::string>>{{""}, {"/injected"}, {"a.b"}, {"blocks", "blocks"}}) {
    kv::Encoded odd = coded;
    odd.arrays.clear();
    for (const std::string& name : names) {
      kv::CodeArray a;
      a.name = name;
      a.bytes = {1, 2, 3};
      odd.arrays.push_back(a);
    }
    kv::PageStore w(dir, true);
    const kv::Encoded e = kv::put_external(odd, w, false);
    w.commit();
    EXPECT_EQ(kvtest::exit_code_of([&] { kv::fetch_external(e); }), 65) << names[0];
  }
  // Every truncation and a few thousand random byte changes of a real object: parsed, or a data
  // error; never a crash or an out-of-bounds read (the sanitizer build runs this).
  std::mt19937 rng(7);
  for (size_t n = 0; n <= blob.size(); n += n < 64 ? 1 : 97) {
    const std::vector<uint8_t> part(blob.begin(), blob.begin() + static_cast<ptrdiff_t>(n));
    const int code = kvtest::exit_code_of([&] { kv::parse_external_object(part, "x", q8); });
    EXPECT_EQ(code, n == blob.size() ? 0 : 65) << n;
  }
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<uint8_t> bad = blob;
    for (int k = 0, m = 1 + int(rng() % 4); k < m; ++k)
      bad[size_t(rng() % std::min<size_t>(bad.size(), trial % 2 ? bad.size() : 64))] =
          uint8_t(rng());
    const int code = kvtest::exit_code_of([&] { kv::parse_external_object(bad, "x", q8); });
    EXPECT_TRUE(code == 0 || code == 65) << trial << ": " << code;
  }
  // A snapshot of external tensors: read as q8_0; with keep_stored, the arrays as encoded.
  kv::Snapshot moved = s;
  for (kv::Layer& l : moved.layers) {
    const kv::RowLayout r{s.header.model, l.head_offsets, l.positions};
    kv::PageStore w(dir, true);
    l.k_stored = std::make_shared<kv::Encoded>(kv::put_external(kv::encode(q8, l.k, r), w, false));
    w.commit();
  }
  const std::string path = kvtest::temp_dir() + "/external.kv.h5";
  kv::write_snapshot(path, moved);
  kv::SnapshotReader reader(path, {.keep_stored = true});
  kv::Layer got;
  reader.read_layer(0, got);
  EXPECT_EQ(got.k_encoding, q8);
  ASSERT_TRUE(got.k_stored);
  EXPECT_EQ(got.k_stored->encoding, q8);
  EXPECT_EQ(got.k_stored->arrays[0].bytes, coded.arrays[0].bytes);
  EXPECT_FALSE(got.v_stored);  // dense v: nothing stored aside
  std::vector<float> decoded(l0.k.size());
  kv::decode(coded, rows, decoded.data());
  EXPECT_EQ(got.k.to_f32(), decoded);
}

}  // namespace
