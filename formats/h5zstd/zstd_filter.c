#include "zstd_filter.h"

#include <stdlib.h>
#include <zstd.h>

static size_t zstd_filter(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[],
                          size_t nbytes, size_t* buf_size, void** buf) {
  void* out = NULL;
  size_t out_size;
  if (flags & H5Z_FLAG_REVERSE) {
    unsigned long long content = ZSTD_getFrameContentSize(*buf, nbytes);
    if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN) return 0;
    out = malloc(content ? content : 1);
    if (!out) return 0;
    out_size = ZSTD_decompress(out, content, *buf, nbytes);
    if (ZSTD_isError(out_size) || out_size != content) {
      free(out);
      return 0;
    }
  } else {
    int level = cd_nelmts > 0 ? (int)cd_values[0] : 3;
    size_t bound = ZSTD_compressBound(nbytes);
    out = malloc(bound);
    if (!out) return 0;
    out_size = ZSTD_compress(out, bound, *buf, nbytes, level);
    if (ZSTD_isError(out_size)) {
      free(out);
      return 0;
    }
  }
  free(*buf);
  *buf = out;
  *buf_size = out_size;
  return out_size;
}

const H5Z_class2_t kv_zstd_filter_class = {
    H5Z_CLASS_T_VERS, KV_H5Z_FILTER_ZSTD, 1, 1, "Zstandard compression: http://www.zstd.net",
    NULL,             NULL,               zstd_filter};
