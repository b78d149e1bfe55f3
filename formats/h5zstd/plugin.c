/* Entry points HDF5 looks up in a dynamically loaded filter plugin (HDF5_PLUGIN_PATH). */
#include <H5PLextern.h>

#include "zstd_filter.h"

H5PL_type_t H5PLget_plugin_type(void) { return H5PL_TYPE_FILTER; }
const void* H5PLget_plugin_info(void) { return &kv_zstd_filter_class; }
