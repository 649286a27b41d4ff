# cmake -DFILES="a.txt;b.txt;..." -P same_digests.cmake: the digests of the results of one CUDA
# test under different fiber schedules (KFAC_KERNELS_CUDA_EMULATION_DIGEST) must be identical.
list(GET FILES 0 first)
file(READ ${first} want)
foreach(f ${FILES})
  if(NOT EXISTS ${f})
    message(FATAL_ERROR "no digest ${f}: did its schedule's test run?")
  endif()
  file(READ ${f} got)
  if(NOT got STREQUAL want)
    message(FATAL_ERROR "results differ between fiber schedules (a race): ${first}: ${want}"
                        "${f}: ${got}")
  endif()
endforeach()
message(STATUS "same results under every schedule: ${want}")
