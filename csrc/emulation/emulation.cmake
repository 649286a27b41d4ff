# CUDA emulation (KFAC_KERNELS_CUDA_EMULATION=ON): every csrc/cuda/*.cu compiled for the CPU by the
# host compiler with __CUDA_ARCH__ = 800 (and 900 for the files that branch on __CUDA_ARCH__),
# and the CUDA C++ tests (csrc/tests/test_*_cuda.cpp) built against it and registered once per
# architecture and fiber schedule, with CTest label `cuda-emulated`. See csrc/emulation/ and the
# "CUDA kernels without a GPU" section of docs/ARCHITECTURE.md.
#
# Included from the top-level CMakeLists.txt after the CPU library (kfac_kernels_cpu) exists.

find_package(Python3 REQUIRED COMPONENTS Interpreter)
include(CheckCXXCompilerFlag)
# The emulated kernels only run where they are built: the host's own instructions (fma / fmaf
# inline instead of a library call) make them several times faster.
check_cxx_compiler_flag(-march=native KFAC_EMULATION_MARCH_NATIVE)

set(KFAC_EMULATION_DIR ${PROJECT_SOURCE_DIR}/csrc/emulation)
file(MAKE_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/cuda_emulation/digests)
set(KFAC_EMULATION_RUNTIME ${KFAC_EMULATION_DIR}/src/fiber.cpp
    ${KFAC_EMULATION_DIR}/src/scheduler.cpp ${KFAC_EMULATION_DIR}/src/runtime.cpp)

# The front end: one generated C++ translation unit per .cu file (build products).
file(GLOB KFAC_EMULATED_CU CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu)
set(KFAC_EMULATED_ALL)
set(KFAC_EMULATED_ARCH_BRANCHING)
foreach(cu ${KFAC_EMULATED_CU})
  get_filename_component(name ${cu} NAME_WE)
  file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${cu})
  set(out ${CMAKE_CURRENT_BINARY_DIR}/cuda_emulation/${name}.cu.cpp)
  add_custom_command(
    OUTPUT ${out}
    COMMAND ${Python3_EXECUTABLE} ${KFAC_EMULATION_DIR}/cuda_frontend.py ${cu} ${out}
            --display-name ${rel}
    DEPENDS ${cu} ${KFAC_EMULATION_DIR}/cuda_frontend.py
    COMMENT "CUDA emulation front end: ${rel}"
    VERBATIM)
  list(APPEND KFAC_EMULATED_ALL ${out})
  file(READ ${cu} content)
  if(content MATCHES "__CUDA_ARCH__")
    list(APPEND KFAC_EMULATED_ARCH_BRANCHING ${name})
  endif()
endforeach()

# kfac_kernels_cuda_emulated_sm<arch>: the given generated sources and the emulation runtime.
function(kfac_emulated_library arch)
  set(target kfac_kernels_cuda_emulated_sm${arch})
  add_library(${target} STATIC ${ARGN} ${KFAC_EMULATION_RUNTIME})
  target_include_directories(${target} BEFORE PUBLIC ${KFAC_EMULATION_DIR}/include)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR}/csrc/include
                             PRIVATE ${PROJECT_SOURCE_DIR}/csrc/cuda ${KFAC_EMULATION_DIR}/src)
  target_compile_definitions(${target} PUBLIC KFAC_KERNELS_WITH_CUDA
                             PRIVATE __CUDA_ARCH__=${arch} KFAC_KERNELS_EMULATED_ARCH=${arch})
  # IEEE rounding of every operation as written (the device contracts only what nvcc contracts;
  # here nothing is), CUDA-style type punning of shared memory, nvcc's pragmas ignored.
  target_compile_options(${target} PRIVATE -ffp-contract=off -fno-strict-aliasing
                         -Wno-unknown-pragmas)
  if(KFAC_EMULATION_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
endfunction()

# Kernels whose launch depends on the device's limits run at both architectures too: block_eigh
# keeps its eigenvectors in shared memory where they fit (more sizes on sm_90's 227 KB).
foreach(name block_eigh)
  if(NOT name IN_LIST KFAC_EMULATED_ARCH_BRANCHING)
    list(APPEND KFAC_EMULATED_ARCH_BRANCHING ${name})
  endif()
endforeach()

set(KFAC_EMULATED_ARCH_SOURCES)
foreach(name ${KFAC_EMULATED_ARCH_BRANCHING})
  list(APPEND KFAC_EMULATED_ARCH_SOURCES ${CMAKE_CURRENT_BINARY_DIR}/cuda_emulation/${name}.cu.cpp)
endforeach()
kfac_emulated_library(800 ${KFAC_EMULATED_ALL})
if(KFAC_EMULATED_ARCH_SOURCES)
  kfac_emulated_library(900 ${KFAC_EMULATED_ARCH_SOURCES})
endif()

# Tests: test_<kernel>_cuda.cpp runs at sm_80, and at sm_90 when <kernel>.cu branches on the
# architecture; every run once per schedule. `--quick` keeps the label short (full sizes with
# KFAC_KERNELS_CUDA_EMULATION_FULL=ON).
set(KFAC_EMULATION_SCHEDULES "forward;reverse" CACHE STRING
    "Fiber schedules the emulated CUDA tests run under (forward, reverse, random[:SEED])")
set(quick_arg --quick)
if(KFAC_KERNELS_CUDA_EMULATION_FULL)
  set(quick_arg)
endif()
file(GLOB KFAC_CUDA_TESTS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/tests/test_*_cuda.cpp)
foreach(test_src ${KFAC_CUDA_TESTS})
  get_filename_component(test_name ${test_src} NAME_WE)
  string(REGEX REPLACE "^test_(.*)_cuda$" "\\1" kernel ${test_name})
  set(archs 800)
  if(kernel IN_LIST KFAC_EMULATED_ARCH_BRANCHING)
    list(APPEND archs 900)
  endif()
  foreach(arch ${archs})
    set(exe ${test_name}_emulated_sm${arch})
    add_executable(${exe} ${test_src})
    target_link_libraries(${exe} PRIVATE kfac_kernels_cuda_emulated_sm${arch} kfac_kernels_cpu)
    # every schedule must pass, and give bitwise the same results (digests compared afterwards)
    set(digests)
    foreach(schedule ${KFAC_EMULATION_SCHEDULES})
      string(REPLACE ":" "_" tag ${schedule})
      set(name ${kernel}_cuda_emulated_sm${arch}_${tag})
      set(digest ${CMAKE_CURRENT_BINARY_DIR}/cuda_emulation/digests/${name}.txt)
      list(APPEND digests ${digest})
      add_test(NAME ${name} COMMAND ${exe} ${quick_arg})
      # One OpenMP thread for the CPU reference kernels: ctest -j runs the schedules side by
      # side, and two processes of two OpenMP threads on two cores wait out a time slice at
      # every barrier of the reference (symmetric_factor_update's quick test: 578 s per
      # schedule side by side on 2 cores, 8 s alone; the emulation itself is single-threaded).
      set_tests_properties(${name} PROPERTIES
        LABELS cuda-emulated
        FIXTURES_SETUP ${kernel}_sm${arch}_schedules
        ENVIRONMENT "OMP_NUM_THREADS=1;KFAC_KERNELS_CUDA_EMULATION_SCHEDULE=${schedule};KFAC_KERNELS_CUDA_EMULATION_DIGEST=${digest}")
    endforeach()
    list(LENGTH digests n_digests)
    if(n_digests GREATER 1)
      set(name ${kernel}_cuda_emulated_sm${arch}_schedules_agree)
      add_test(NAME ${name} COMMAND ${CMAKE_COMMAND} -DFILES=${digests}
               -P ${KFAC_EMULATION_DIR}/same_digests.cmake)
      set_tests_properties(${name} PROPERTIES LABELS cuda-emulated
                           FIXTURES_REQUIRED ${kernel}_sm${arch}_schedules)
    endif()
  endforeach()
endforeach()
message(STATUS "kfac_kernels: CUDA emulation at sm_80 (sm_90 too for: "
               "${KFAC_EMULATED_ARCH_BRANCHING}), schedules ${KFAC_EMULATION_SCHEDULES}")
