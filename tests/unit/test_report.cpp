// kv-eval report's pieces: the results reader (checks, Pareto front), the SVG chart (any label,
// any finite value), and the whole-or-nothing file writes behind --append and --plot.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>

#include "helpers.h"
#include "kv/error.h"
#include "kv/file.h"
#include "kv/plot.h"
#include "kv/report.h"

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void put(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string result_line(const std::string& label, double bytes, double rel_error) {
  return "{\"label\":\"" + label + "\",\"bytes_per_token\":" + std::to_string(bytes) +
         ",\"ratio_to_reference\":0.5,\"rel_error\":" + std::to_string(rel_error) + "}\n";
}

// Runs f in a child process whose file size limit is `bytes` (SIGXFSZ ignored, so writes past
// it fail with EFBIG instead of killing it); returns the sysexits code f threw, 0 if none.
int with_file_size_limit(rlim_t bytes, const std::function<void()>& f) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{bytes, bytes};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    ::_exit(kvtest::exit_code_of(f));
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

TEST(Report, SortsByBytesAndMarksTheParetoFront) {
  const std::string path = kvtest::temp_dir() + "/front.jsonl";
  // c is dominated by a (fewer bytes, lower error); b and a trade bytes for error.
  put(path,
      result_line("b", 200, 0.1) + result_line("c", 300, 0.4) + "\n" + result_line("a", 100, 0.3));
  std::string metric;
  const std::vector<kv::ResultRow> rows = kv::read_results(path, metric);
  EXPECT_EQ(metric, "rel_error");  // no kl in every row
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].label, "a");
  EXPECT_EQ(rows[1].label, "b");
  EXPECT_EQ(rows[2].label, "c");
  EXPECT_TRUE(rows[0].pareto);
  EXPECT_TRUE(rows[1].pareto);
  EXPECT_FALSE(rows[2].pareto);
  EXPECT_DOUBLE_EQ(rows[2].metric, 0.4);
}

TEST(Report, ImpossibleValuesAreDataErrorsNamingTheField) {
  const std::string dir = kvtest::temp_dir();
  auto code_and_message = [&](const std::string& text, std::string metric) {
    put(dir + "/bad.jsonl", text);
    try {
      kv::read_results(dir + "/bad.jsonl", metric);
    } catch (const kv::Error& e) {
      return std::pair{int(e.code()), std::string(e.what())};
    }
    return std::pair{0, std::string()};
  };
  const std::string good = result_line("ok", 100, 0.1);
  auto [c1, m1] = code_and_message(good + result_line("neg", -5, 0.1), "");
  EXPECT_EQ(c1, 65);
  EXPECT_NE(m1.find("line 2: bytes_per_token -5"), std::string::npos) << m1;
  auto [c2, m2] = code_and_message(good + result_line("neg", 5, -0.25), "");
  EXPECT_EQ(c2, 65);
  EXPECT_NE(m2.find("result 'neg': rel_error -0.25"), std::string::npos) << m2;
  // Recalls and cosines have bounds; ppl_delta may be negative (a better candidate).
  auto [c3, m3] = code_and_message(
      "{\"bytes_per_token\":1,\"ratio_to_reference\":1,"
      "\"mass_recall\":1.5}\n",
      "mass_recall");
  EXPECT_EQ(c3, 65);
  EXPECT_NE(m3.find("mass_recall 1.5"), std::string::npos) << m3;
  auto [c4, m4] = code_and_message(
      "{\"bytes_per_token\":1,\"ratio_to_reference\":1,"
      "\"ppl_delta\":-0.5}\n",
      "ppl_delta");
  EXPECT_EQ(c4, 0) << m4;
  EXPECT_EQ(kvtest::exit_code_of([&] {
              std::string metric;
              kv::read_results(dir, metric);
            }),
            66);
}

TEST(Plot, AnyLabelGivesWellFormedXmlText) {
  const std::string long_label(700, 'x');
  const std::string svg =
      kv::svg_scatter_front({1, 2, 3}, {0.5, 0.25, 0.75},
                            {long_label, std::string("nul\0ctl\x01", 8), "bad \xff utf8 <&>"},
                            {true, true, false}, "title \x02", "x", "y");
  EXPECT_NE(svg.find(long_label), std::string::npos) << "a long label is kept whole";
  EXPECT_NE(svg.find("nul&#xFFFD;ctl&#xFFFD;"), std::string::npos);
  EXPECT_NE(svg.find("bad &#xFFFD; utf8 &lt;&amp;&gt;"), std::string::npos);
  EXPECT_NE(svg.find("title &#xFFFD;"), std::string::npos);
  for (char c : svg) EXPECT_TRUE(uint8_t(c) >= 0x20 || c == '\n') << "raw control byte " << int(c);
  EXPECT_EQ(svg.find('\xff'), std::string::npos);
  EXPECT_EQ(svg.find("\xc3\xa9"), std::string::npos);  // (no valid UTF-8 was in the input)
  const std::string accents =
      kv::svg_scatter_front({1}, {1}, {"caf\xc3\xa9"}, {true}, "t", "x", "y");
  EXPECT_NE(accents.find("caf\xc3\xa9"), std::string::npos) << "valid UTF-8 is kept";
}

TEST(Plot, ExtremeAndNegativeValuesStayInsideTheFrame) {
  // The frame is x in [80, 720], y in [40, 440] (svg_scatter_front's layout).
  auto circles = [](const std::string& svg) {
    std::vector<std::pair<double, double>> at;
    const std::regex circle("<circle cx=\"([^\"]+)\" cy=\"([^\"]+)\"");
    for (auto it = std::sregex_iterator(svg.begin(), svg.end(), circle);
         it != std::sregex_iterator(); ++it)
      at.emplace_back(std::stod((*it)[1]), std::stod((*it)[2]));
    return at;
  };
  for (const auto& [x, y] :
       {std::pair<std::vector<double>, std::vector<double>>{{1.7e308, 1}, {0.5, 1e308}},
        {{10, 20, 30}, {-0.5, 0.25, -2}},
        {{0, 0}, {0, 0}}}) {
    const std::string svg =
        kv::svg_scatter_front(x, y, {"a", "b", "c"}, {true, false, true}, "t", "x", "y");
    const auto at = circles(svg);
    ASSERT_EQ(at.size(), x.size());
    for (auto [cx, cy] : at) {
      EXPECT_GE(cx, 80 - 1e-6) << svg;
      EXPECT_LE(cx, 720 + 1e-6) << svg;
      EXPECT_GE(cy, 40 - 1e-6) << svg;
      EXPECT_LE(cy, 440 + 1e-6) << svg;
    }
  }
}

TEST(File, AppendIsAllOrNothing) {
  const std::string dir = kvtest::temp_dir(), path = dir + "/results.jsonl";
  put(path, "first\n");
  kv::append_to_file(path, "second\n");
  EXPECT_EQ(slurp(path), "first\nsecond\n");
  // A line that does not fit under the size limit: the file is cut back to what it held.
  const std::string big(4096, 'z');
  EXPECT_EQ(with_file_size_limit(1024, [&] { kv::append_to_file(path, big + "\n"); }), 74);
  EXPECT_EQ(slurp(path), "first\nsecond\n");
  // A file the failed call created is removed.
  const std::string fresh = dir + "/fresh.jsonl";
  EXPECT_EQ(with_file_size_limit(1024, [&] { kv::append_to_file(fresh, big + "\n"); }), 74);
  EXPECT_NE(::access(fresh.c_str(), F_OK), 0);
  EXPECT_EQ(kvtest::exit_code_of([] { kv::append_to_file("/dev/full", "x\n"); }), 74);
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::append_to_file(dir + "/no/such/dir/r.jsonl", "x\n"); }),
            73);
}

TEST(File, AtomicWriteReplacesWholeOrKeepsTheOldFile) {
  const std::string dir = kvtest::temp_dir(), path = dir + "/chart.svg";
  kv::write_file_atomically(path, std::string("old chart"));
  kv::write_file_atomically(path, std::string("new chart"));
  EXPECT_EQ(slurp(path), "new chart");
  const std::string big(8192, 'y');
  EXPECT_EQ(with_file_size_limit(1024, [&] { kv::write_file_atomically(path, big); }), 74);
  EXPECT_EQ(slurp(path), "new chart");
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    EXPECT_EQ(entry.path().filename().string().find(".tmp"), std::string::npos)
        << "temporary file left: " << entry.path();
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::write_file_atomically(dir + "/no/dir/c.svg", "x"); }),
            73);
}

TEST(File, FatalSignalRemovesRegisteredTemporaryFiles) {
  const std::string dir = kvtest::temp_dir(), live = dir + "/.out.tmp1", done = dir + "/.out.tmp2";
  const pid_t pid = ::fork();
  if (pid == 0) {
    // A child: SIGTERM's disposition may be the handler already, installed by an earlier test.
    put(live, "partial");
    kv::register_temp_file(live);
    put(done, "renamed into place");
    kv::register_temp_file(done);
    kv::unregister_temp_file(done);  // no longer temporary: the handler must leave it
    std::raise(SIGTERM);
    ::_exit(0);  // not reached: the handler raises SIGTERM again with its default action
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status;
  EXPECT_NE(::access(live.c_str(), F_OK), 0) << "registered temporary file left";
  EXPECT_EQ(slurp(done), "renamed into place");
}

TEST(File, SameFileFollowsLinksNotNames) {
  const std::string dir = kvtest::temp_dir();
  put(dir + "/a", "a");
  put(dir + "/b", "b");
  ASSERT_EQ(::symlink((dir + "/a").c_str(), (dir + "/link").c_str()), 0);
  EXPECT_TRUE(kv::same_file(dir + "/a", dir + "/link"));
  EXPECT_TRUE(kv::same_file(dir + "/a", dir + "/./a"));
  EXPECT_FALSE(kv::same_file(dir + "/a", dir + "/b"));
  EXPECT_FALSE(kv::same_file(dir + "/a", dir + "/missing"));
  // "-" as the input is stdin: a tool reading IN from stdin must not write -o IN.
  const int saved = ::dup(0);
  const int in = ::open((dir + "/a").c_str(), O_RDONLY);
  ASSERT_GE(in, 0);
  ASSERT_EQ(::dup2(in, 0), 0);
  EXPECT_TRUE(kv::same_file("-", dir + "/link"));
  EXPECT_FALSE(kv::same_file("-", dir + "/b"));
  ::dup2(saved, 0);
  ::close(in);
  ::close(saved);
}
