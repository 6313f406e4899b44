"""Development commands beside the product: ahead-of-time compilation for TPU slices
(`aot`), timing (`bench`), official parity checks (`parity`), the CPU split into
simulated devices (`cpu_devices`) and glibc allocator settings (`host_memory`)."""
