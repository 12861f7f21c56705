// The device-side error flag (dlmkern/error_flag.h) and the count of host reads of tensor values.
// On CPU tensors the op drivers read argument values on the host and raise at once (free there);
// on a GPU every read is a device sync, so the CUDA glue checks values on the device into the flag
// and the caller reads it once per sampler block / training step (dlmkern.ops.check_device_errors).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dlmkern {

// Counts one read of tensor values by the host (tests assert the CUDA glue does none per call).
void note_host_read();
int64_t host_reads();

// t.item<T>(), counted.
template <typename T>
T read_item(const at::Tensor& t) {
  note_host_read();
  return t.item<T>();
}

// t's values on the host as `dtype`, counted.
inline at::Tensor read_to_host(const at::Tensor& t, at::ScalarType dtype) {
  note_host_read();
  return t.to(at::kCPU, dtype);
}

// like's device flag (one int32), allocated on first use; undefined when it does not exist yet
// and may not be allocated now (an allocation inside a CUDA-graph capture would be replayed).
at::Tensor device_error_flag(const at::Tensor& like, bool may_allocate);

// ORs `bit` into `flag` if any element of the bool tensor `bad` is true: on the device, no sync.
// An undefined flag (none could be allocated) records nothing.
void flag_if_any(const at::Tensor& flag, const at::Tensor& bad, unsigned bit);

// Reads and clears the flag of `device` (one host read when it exists); returns its bits.
int64_t take_device_errors(at::Device device);

// Raises (IndexError for out-of-range indices, else ValueError) naming what earlier calls on
// `device` met, if its flag is set; clears it.
void raise_device_errors(const char* op, at::Device device);

// How an op driver checks argument values (targets, rows, seq_ids): on the host, raising at once
// (CPU backends), or on the device into `flag` (CUDA glue; flag undefined: nothing recorded).
struct ValueCheck {
  bool on_host = true;
  at::Tensor flag;
};

// The CPU backends' value check: on the host.
inline ValueCheck host_value_check(const at::Tensor& /*like*/) { return ValueCheck{}; }

}  // namespace dlmkern
