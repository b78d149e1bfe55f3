// Round trips of the kvsnap reader/writer: every dtype, ragged heads, side data, each codec,
// through named files and through pipes (FIFOs take the in-memory image paths).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "helpers.h"
#include "kv/error.h"
#include "kv/snapshot_io.h"
#include "kv/synth.h"

namespace fs = std::filesystem;
using kv::DType;

struct RoundTripCase {
  DType dtype;
  bool side_data;
  bool ragged;
  const char* codec;
};

class RoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(RoundTrip, FileGivesIdenticalData) {
  const auto& c = GetParam();
  kv::Snapshot snap = kvtest::tiny_snapshot(c.dtype, c.side_data, c.ragged);
  const char* argv[] = {"kv-test", "--x", "it's quoted"};
  kv::append_provenance(snap.header, "kv-test", 3, argv);
  kv::append_provenance(snap.header, "kv-test", 3, argv);
  const std::string path = kvtest::temp_dir() + "/rt.kv.h5";
  kv::WriteOptions w;
  w.codec = kv::Codec::parse(c.codec);
  kv::write_snapshot(path, snap, w);
  kv::Snapshot back = kv::read_snapshot(path);
  kvtest::expect_same(snap, back);
  kv::SnapshotReader reader(path);
  EXPECT_EQ(reader.codec_name(), w.codec.str());
}

TEST_P(RoundTrip, PipeGivesIdenticalData) {
  const auto& c = GetParam();
  kv::Snapshot snap = kvtest::tiny_snapshot(c.dtype, c.side_data, c.ragged);
  const std::string fifo = kvtest::temp_dir() + "/pipe";
  fs::remove(fifo);
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  kv::WriteOptions w;
  w.codec = kv::Codec::parse(c.codec);
  std::thread writer([&] { kv::write_snapshot(fifo, snap, w); });
  kv::Snapshot back = kv::read_snapshot(fifo);
  writer.join();
  kvtest::expect_same(snap, back);
}

INSTANTIATE_TEST_SUITE_P(AllDtypesAndCodecs, RoundTrip,
                         ::testing::Values(RoundTripCase{DType::f32, false, false, "none"},
                                           RoundTripCase{DType::f16, false, false, "none"},
                                           RoundTripCase{DType::bf16, false, false, "none"},
                                           RoundTripCase{DType::f16, true, true, "none"},
                                           RoundTripCase{DType::f32, true, true, "zstd"},
                                           RoundTripCase{DType::f16, true, true, "zstd,19"},
                                           RoundTripCase{DType::bf16, true, true, "deflate"},
                                           RoundTripCase{DType::f16, false, true, "deflate,1"}),
                         [](const auto& info) {
                           std::string name = std::string(kvk::dtype_name(info.param.dtype)) +
                                              (info.param.side_data ? "_side" : "") +
                                              (info.param.ragged ? "_ragged" : "") + "_" +
                                              info.param.codec;
                           for (char& ch : name)
                             if (ch == ',') ch = '_';
                           return name;
                         });

TEST(SnapshotIo, EmptyHeadsAndEmptyLayerRoundTrip) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, false, false);
  kv::Layer& l0 = snap.layers[0];  // layer 0: every entry evicted
  l0.positions.clear();
  l0.head_offsets = {0, 0, 0};
  l0.k.resize(DType::f16, 0, 4);
  l0.v.resize(DType::f16, 0, 4);
  for (const char* codec : {"none", "zstd"}) {
    const std::string path = kvtest::temp_dir() + "/empty.kv.h5";
    kv::WriteOptions w;
    w.codec = kv::Codec::parse(codec);
    kv::write_snapshot(path, snap, w);
    kvtest::expect_same(snap, kv::read_snapshot(path));
  }
}

TEST(SnapshotIo, IdenticalInputsGiveByteIdenticalFiles) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, true, true);
  const std::string a = kvtest::temp_dir() + "/a.kv.h5", b = kvtest::temp_dir() + "/b.kv.h5";
  kv::write_snapshot(a, snap);
  kv::write_snapshot(b, snap);
  std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
  std::string da((std::istreambuf_iterator<char>(fa)), {}),
      db((std::istreambuf_iterator<char>(fb)), {});
  EXPECT_FALSE(da.empty());
  EXPECT_EQ(da, db);
}

TEST(SnapshotIo, LayerStreamingReusesBuffersAndReadsAnyOrder) {
  kv::SynthSpec spec;
  spec.model = kv::model_preset("tiny");
  spec.n_tokens = 300;
  kv::Snapshot snap = kv::synth_snapshot(spec);
  const std::string path = kvtest::temp_dir() + "/stream.kv.h5";
  kv::write_snapshot(path, snap);
  kv::SnapshotReader reader(path);
  kv::Layer layer;
  for (int l : {1, 0, 1}) {
    reader.read_layer(l, layer);
    EXPECT_TRUE(layer.k.same_contents(snap.layers[size_t(l)].k));
    EXPECT_TRUE(layer.v.same_contents(snap.layers[size_t(l)].v));
  }
  kv::LayerStorage st = reader.layer_storage(0);
  EXPECT_EQ(st.entries, 600);
  EXPECT_EQ(st.kv_bytes_stored, 2 * 600 * 16 * 2);  // codec none: exactly the dense bytes
}

TEST(SnapshotIo, ZstdShrinksCompressibleData) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f32, false, false);
  for (auto& l : snap.layers) {
    std::vector<float> zeros(l.k.size(), 0.0f);
    l.k = kv::Tensor::from_f32(DType::f32, l.k.rows(), l.k.cols(), zeros.data());
  }
  const std::string plain = kvtest::temp_dir() + "/plain.kv.h5",
                    z = kvtest::temp_dir() + "/z.kv.h5";
  kv::write_snapshot(plain, snap);
  kv::WriteOptions w;
  w.codec = kv::Codec::parse("zstd");
  kv::write_snapshot(z, snap, w);
  kv::SnapshotReader rp(plain), rz(z);
  EXPECT_LT(rz.layer_storage(0).kv_bytes_stored, rp.layer_storage(0).kv_bytes_stored);
}

TEST(SnapshotIo, ProvenanceChainsRecords) {
  kv::Header h;
  const char* argv[] = {"/usr/local/bin/kv-evict", "--ratio", "0.25", "in file.kv.h5"};
  kv::append_provenance(h, "kv-synth", 1, argv);
  kv::append_provenance(h, "kv-evict", 4, argv);
  kv::append_provenance(h, "kv-evict", 4, argv);
  ASSERT_EQ(h.provenance.size(), 3u);
  EXPECT_EQ(h.provenance[0].id, "kv-synth");
  EXPECT_EQ(h.provenance[0].previous, "");
  EXPECT_EQ(h.provenance[1].id, "kv-evict");
  EXPECT_EQ(h.provenance[1].previous, "kv-synth");
  EXPECT_EQ(h.provenance[2].id, "kv-evict.1");
  EXPECT_EQ(h.provenance[2].previous, "kv-evict");
  EXPECT_EQ(h.provenance[1].command_line, "kv-evict --ratio 0.25 'in file.kv.h5'");
  // Control characters keep a record on one line (bash's $'...' reads it back the same).
  const char* odd[] = {"kv-capture", "-p", "two\nlines\tand 'quote' \\ \x01", "it's"};
  EXPECT_EQ(kv::quote_command_line(4, odd),
            "kv-capture -p $'two\\nlines\\tand \\'quote\\' \\\\ \\x01' 'it'\\''s'");
  // History: newest line first, NCO style "Www Mmm dd hh:mm:ss yyyy: command".
  EXPECT_NE(h.history.find(": kv-evict --ratio 0.25"), std::string::npos);
  EXPECT_LT(h.history.find("kv-evict"), h.history.find("kv-synth"));
  EXPECT_EQ(std::count(h.history.begin(), h.history.end(), '\n'), 2);
}

TEST(SnapshotIo, CodecParsing) {
  EXPECT_EQ(kv::Codec::parse("none").str(), "none");
  EXPECT_EQ(kv::Codec::parse("zstd").str(), "zstd,3");
  EXPECT_EQ(kv::Codec::parse("zstd,19").str(), "zstd,19");
  EXPECT_EQ(kv::Codec::parse("deflate").str(), "deflate,6");
  for (const char* bad : {"zstd,0", "zstd,23", "deflate,10", "lz4", "zstd,x", "none,1", ""}) {
    try {
      kv::Codec::parse(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const kv::Error& e) {
      EXPECT_EQ(e.code(), kv::Exit::usage) << bad;
    }
  }
}

TEST(SnapshotIo, UnfinishedWriterLeavesNoFile) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, false, false);
  const std::string dir = kvtest::temp_dir() + "/unfinished";
  fs::create_directories(dir);
  {
    kv::SnapshotWriter w(dir + "/out.kv.h5", snap.header);
    w.write_layer(snap.layers[0]);
    EXPECT_THROW(w.finish(), kv::Error);  // one layer missing
  }
  EXPECT_TRUE(fs::is_empty(dir));
}
