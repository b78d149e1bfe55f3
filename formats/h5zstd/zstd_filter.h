/* HDF5 filter 32015 (Zstandard), compatible with the public HDF5 zstd plugin: cd_values[0] is
 * the compression level (default 3), each chunk is one zstd frame that records its content size.
 * Compiled into libkv (registered in-process) and into the h5zstd plugin library for h5dump/h5py. */
#ifndef KV_ZSTD_FILTER_H
#define KV_ZSTD_FILTER_H
#include <hdf5.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_H5Z_FILTER_ZSTD 32015
extern const H5Z_class2_t kv_zstd_filter_class;

#ifdef __cplusplus
}
#endif
#endif
