# The CUDA side of CMakeLists.txt: where cuSOLVER, NVRTC and the CUDA runtime are, and which
# architectures nvcc really builds for.
#
# A pip-installed CUDA torch brings its CUDA libraries as nvidia wheels beside it
# (site-packages/nvidia/cu13/{include,lib} for CUDA 13, nvidia/<library>/{include,lib} for CUDA
# 12), with versioned file names only (libcusolver.so.12, libnvrtc.so.13); an nvcc-only toolkit
# has neither cusolverDn.h nor libcusolver nor libnvrtc. The toolkit's own copy wins; the wheels
# are the fall-back; a library found in neither stops the configure with one line that names it.

# The folders with include/ and lib/ of the nvidia wheels beside the torch on CMAKE_PREFIX_PATH
# (or Torch_DIR), then SAP_FAST_CUDA_ROOTS.
function(_sap_fast_wheel_roots out)
  set(sites "")
  foreach(prefix IN LISTS CMAKE_PREFIX_PATH)
    if(EXISTS "${prefix}/Torch/TorchConfig.cmake")  # <site>/torch/share/cmake
      get_filename_component(site "${prefix}/../../.." ABSOLUTE)
      list(APPEND sites "${site}")
    endif()
  endforeach()
  if(Torch_DIR AND EXISTS "${Torch_DIR}/TorchConfig.cmake")  # <site>/torch/share/cmake/Torch
    get_filename_component(site "${Torch_DIR}/../../../.." ABSOLUTE)
    list(APPEND sites "${site}")
  endif()
  set(roots ${SAP_FAST_CUDA_ROOTS})
  foreach(site IN LISTS sites)
    file(GLOB found LIST_DIRECTORIES true "${site}/nvidia/*")
    foreach(dir IN LISTS found)
      if(IS_DIRECTORY "${dir}/include" OR IS_DIRECTORY "${dir}/lib")
        list(APPEND roots "${dir}")
      endif()
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES roots)
  set(${out} "${roots}" PARENT_SCOPE)
endfunction()

# sap_fast_find_cuda_libraries(): after find_package(CUDAToolkit), before find_package(Torch).
# Makes CUDA::cudart and CUDA::cusolver exist, sets CUDA_nvrtc_LIBRARY (torch's CMake links it),
# CUDA_TOOLKIT_ROOT_DIR (torch's FindCUDA guesses it from the nvcc on PATH, which may be a wrapper
# elsewhere) and SAP_FAST_CUDA_MATH_INCLUDE_DIRS (cusolverDn.h and the cublas_v2.h it includes).
function(sap_fast_find_cuda_libraries)
  set(SAP_FAST_CUDA_ROOTS "" CACHE STRING
      "Extra folders with include/ and lib/ holding cuSOLVER, cuBLAS headers, NVRTC (;-list)")
  _sap_fast_wheel_roots(roots)
  set(lib_hints ${CUDAToolkit_LIBRARY_DIR})
  set(include_hints ${CUDAToolkit_INCLUDE_DIRS})
  foreach(root IN LISTS roots)
    list(APPEND lib_hints "${root}/lib" "${root}/lib64")
    list(APPEND include_hints "${root}/include")
  endforeach()
  math(EXPR below "${CUDAToolkit_VERSION_MAJOR} - 1")
  set(where "the CUDA toolkit (${CUDAToolkit_LIBRARY_ROOT}) nor torch's nvidia wheels (${roots})")
  if(roots STREQUAL "")
    set(where "the CUDA toolkit (${CUDAToolkit_LIBRARY_ROOT}), and no nvidia wheels beside torch")
  endif()

  set(missing "")
  foreach(name cudart nvrtc cusolver)
    # the toolkit's unversioned name first, then the wheels' versioned file
    find_library(CUDA_${name}_LIBRARY
                 NAMES ${name} lib${name}.so.${CUDAToolkit_VERSION_MAJOR} lib${name}.so.${below}
                 HINTS ${lib_hints} NO_DEFAULT_PATH)
    if(NOT CUDA_${name}_LIBRARY)
      list(APPEND missing "lib${name}")
    endif()
  endforeach()
  set(include_dirs "")
  foreach(header cusolverDn.h cublas_v2.h)
    string(MAKE_C_IDENTIFIER "SAP_FAST_${header}_DIR" var)
    find_path(${var} ${header} HINTS ${include_hints} NO_DEFAULT_PATH)
    if(${var})
      list(APPEND include_dirs "${${var}}")
    else()
      list(APPEND missing "${header}")
    endif()
  endforeach()
  if(missing)
    list(JOIN missing ", " missing)
    # NOTICE prints the line as it is (FATAL_ERROR would wrap it)
    message(NOTICE "sap_fast: SAP_FAST_CUDA=ON needs ${missing}, found in neither ${where}; "
                   "pip install nvidia-cusolver nvidia-cublas nvidia-cuda-nvrtc nvidia-cuda-runtime "
                   "for CUDA ${CUDAToolkit_VERSION_MAJOR}, or set SAP_FAST_CUDA_ROOTS, or SAP_FAST_CUDA=0")
    message(FATAL_ERROR "sap_fast: missing ${missing}")
  endif()

  foreach(name cudart cusolver)
    if(NOT TARGET CUDA::${name})
      add_library(CUDA::${name} UNKNOWN IMPORTED)
      set_target_properties(CUDA::${name} PROPERTIES IMPORTED_LOCATION "${CUDA_${name}_LIBRARY}")
      target_include_directories(CUDA::${name} SYSTEM INTERFACE ${CUDAToolkit_INCLUDE_DIRS})
    endif()
  endforeach()
  # torch's FindCUDA: its own names for the runtime, and the toolkit nvcc belongs to
  if(NOT CUDA_CUDART_LIBRARY)
    set(CUDA_CUDART_LIBRARY "${CUDA_cudart_LIBRARY}" CACHE FILEPATH "CUDA runtime library")
  endif()
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
    set(CUDA_TOOLKIT_ROOT_DIR "${root}" CACHE PATH "The CUDA toolkit of nvcc")
  endif()
  list(REMOVE_DUPLICATES include_dirs)
  list(REMOVE_ITEM include_dirs ${CUDAToolkit_INCLUDE_DIRS})
  set(SAP_FAST_CUDA_MATH_INCLUDE_DIRS "${include_dirs}" PARENT_SCOPE)
  message(STATUS "sap_fast: cuSOLVER ${CUDA_cusolver_LIBRARY}, NVRTC ${CUDA_nvrtc_LIBRARY}, "
                 "runtime ${CUDA_cudart_LIBRARY}")
endfunction()

# sap_fast_torch_arch_list(<out> "80-real;90"): CMake's spelling -> TORCH_CUDA_ARCH_LIST's
# ("8.0;9.0+PTX"); "-virtual" (PTX only) has no TORCH_CUDA_ARCH_LIST spelling and becomes +PTX.
function(sap_fast_torch_arch_list out archs)
  set(names "")
  foreach(arch IN LISTS archs)
    if(NOT arch MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
      message(FATAL_ERROR "sap_fast: CMAKE_CUDA_ARCHITECTURES=${archs}: use numbers such as 90 or 80-real")
    endif()
    set(name "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(NOT CMAKE_MATCH_4 STREQUAL "-real")
      string(APPEND name "+PTX")
    endif()
    list(APPEND names "${name}")
  endforeach()
  set(${out} "${names}" PARENT_SCOPE)
endfunction()

# sap_fast_built_cuda_archs(<out> "<CMAKE_CUDA_FLAGS>" "<CUDA_ARCHITECTURES>"): what nvcc builds,
# as sm_XX (machine code) and compute_XX (PTX) names, sorted: the -gencode/--generate-code pairs
# in the flags ("arch=compute_90,code=sm_90", "code=[sm_90,compute_90]") and the target's
# CUDA_ARCHITECTURES ("90-real" -> sm_90, "90-virtual" -> compute_90, "90" -> both) unless OFF.
function(sap_fast_built_cuda_archs out flags target_archs)
  set(built "")
  # code= after a comma or a blank, not the one of --generate-code=
  string(REGEX MATCHALL "[ ,;]code=(\\[[^]]*\\]|[^ ;,\"]+)" codes " ${flags}")
  foreach(code IN LISTS codes)
    string(REGEX REPLACE "^.code=\\[?|\\]$" "" code "${code}")
    string(REPLACE "," ";" code "${code}")
    list(APPEND built ${code})
  endforeach()
  if(target_archs AND NOT target_archs MATCHES "^(OFF|NOTFOUND|.*-NOTFOUND)$")
    foreach(arch IN LISTS target_archs)
      if(arch MATCHES "^([0-9]+[af]?)(-real|-virtual)?$")
        if(NOT CMAKE_MATCH_2 STREQUAL "-virtual")
          list(APPEND built "sm_${CMAKE_MATCH_1}")
        endif()
        if(NOT CMAKE_MATCH_2 STREQUAL "-real")
          list(APPEND built "compute_${CMAKE_MATCH_1}")
        endif()
      else()
        list(APPEND built "${arch}")  # all, all-major, native: CMake's own words
      endif()
    endforeach()
  endif()
  list(REMOVE_DUPLICATES built)
  list(SORT built COMPARE NATURAL)
  # sm_ before compute_ of the same number reads best: sort sm_ first
  set(sm "")
  set(ptx "")
  foreach(item IN LISTS built)
    if(item MATCHES "^compute_")
      list(APPEND ptx "${item}")
    else()
      list(APPEND sm "${item}")
    endif()
  endforeach()
  set(built ${sm} ${ptx})
  set(${out} "${built}" PARENT_SCOPE)
endfunction()
