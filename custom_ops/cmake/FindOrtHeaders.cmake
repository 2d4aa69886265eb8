# Finds onnxruntime's C/C++ headers (the PyPI wheel ships none); only headers are needed, since
# the operator library reaches onnxruntime through the OrtApi table it is handed at run time.
#
# Routes, in order; the first that works wins:
#   1. a user path: -DONNXRUNTIME_INCLUDE_DIR=... or the environment variable of that name
#   2. an installed onnxruntime development package (CMake config or a standard include dir)
#   3. headers fetched earlier by route 4 or 5, cached per user in
#      ${XDG_CACHE_HOME:-~/.cache}/haste-onnx/onnxruntime-headers-1.21
#   4. the official onnxruntime 1.21.0 release archive (pinned SHA256)
#   5. on Debian: Debian 13 (trixie)'s libonnxruntime-dev 1.21, fetched with a private apt
#      configuration and unpacked with dpkg -x (fetch_debian_ort_headers.sh; nothing installed)
#
# Defines OrtHeaders_FOUND, OrtHeaders_INCLUDE_DIR, OrtHeaders_API_VERSION, OrtHeaders_ROUTE and
# the interface target OrtHeaders::OrtHeaders.

set(_ort_version 1.21.0)
set(_ort_archive onnxruntime-linux-x64-${_ort_version})
set(_ort_url
    "https://github.com/microsoft/onnxruntime/releases/download/v${_ort_version}/${_ort_archive}.tgz")
# Not verifiable on the project's build machines (they cannot reach that host); it is the value
# that several independent public projects pin for this archive.
set(_ort_sha256 7485c7e7aac6501b27e353dcbe068e45c61ab51fbaf598d13970dfae669d20bf)

if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
  set(_ort_cache_root "$ENV{XDG_CACHE_HOME}")
else()
  set(_ort_cache_root "$ENV{HOME}/.cache")
endif()
set(_ort_cache "${_ort_cache_root}/haste-onnx/onnxruntime-headers-1.21")
set(_ort_tried "")

# Fetches go to a fresh staging directory beside the cache, then move in with one rename (so an
# interrupted fetch never leaves a half-filled cache, and a concurrent build that won the race
# is simply used); staging beside the cache keeps the rename on one file system.
function(_ort_new_staging out_var)
  string(RANDOM LENGTH 12 _suffix)
  set(_dir "${_ort_cache}.staging-${_suffix}")
  file(MAKE_DIRECTORY "${_dir}")
  set(${out_var} "${_dir}" PARENT_SCOPE)
endfunction()

function(_ort_store_in_cache headers staging)
  execute_process(COMMAND "${CMAKE_COMMAND}" -E rename "${headers}" "${_ort_cache}"
                  OUTPUT_QUIET ERROR_QUIET)
  file(REMOVE_RECURSE "${staging}")
endfunction()

# The ORT_API_VERSION of the headers in `dir` (empty without onnxruntime_c_api.h).
function(_ort_api_version dir out_var)
  set(_version "")
  if(EXISTS "${dir}/onnxruntime_c_api.h")
    file(STRINGS "${dir}/onnxruntime_c_api.h" _define REGEX "^#define ORT_API_VERSION [0-9]+")
    string(REGEX REPLACE ".* ([0-9]+)$" "\\1" _version "${_define}")
  endif()
  set(${out_var} "${_version}" PARENT_SCOPE)
endfunction()

# 1. User path.
if(NOT ONNXRUNTIME_INCLUDE_DIR AND DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR})
  set(ONNXRUNTIME_INCLUDE_DIR "$ENV{ONNXRUNTIME_INCLUDE_DIR}")
endif()
if(ONNXRUNTIME_INCLUDE_DIR)
  if(NOT IS_ABSOLUTE "${ONNXRUNTIME_INCLUDE_DIR}")  # the build runs in a directory of its own
    message(FATAL_ERROR "ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} must be an absolute "
                        "path to the directory that holds onnxruntime's headers.")
  endif()
  if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_cxx_api.h"
     OR NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} lacks "
                        "onnxruntime_c_api.h or onnxruntime_cxx_api.h: point it at the directory "
                        "that holds onnxruntime's headers.")
  endif()
  set(OrtHeaders_INCLUDE_DIR "${ONNXRUNTIME_INCLUDE_DIR}")
  set(OrtHeaders_ROUTE "the user path ONNXRUNTIME_INCLUDE_DIR")
endif()

# 2. An installed development package.
if(NOT OrtHeaders_ROUTE)
  find_package(onnxruntime CONFIG QUIET)
  if(TARGET onnxruntime::onnxruntime)
    get_target_property(_ort_hints onnxruntime::onnxruntime INTERFACE_INCLUDE_DIRECTORIES)
  endif()
  find_path(ONNXRUNTIME_INSTALLED_INCLUDE_DIR onnxruntime_cxx_api.h
            HINTS ${_ort_hints}
            PATH_SUFFIXES onnxruntime onnxruntime/core/session)
  _ort_api_version("${ONNXRUNTIME_INSTALLED_INCLUDE_DIR}" _installed_api)
  if(ONNXRUNTIME_INSTALLED_INCLUDE_DIR AND _installed_api GREATER_EQUAL 21)
    set(OrtHeaders_INCLUDE_DIR "${ONNXRUNTIME_INSTALLED_INCLUDE_DIR}")
    set(OrtHeaders_ROUTE "an installed onnxruntime development package")
  elseif(ONNXRUNTIME_INSTALLED_INCLUDE_DIR)  # too old: the next routes may do
    set(_old "${ONNXRUNTIME_INSTALLED_INCLUDE_DIR}: API ${_installed_api}, older than 21")
    list(APPEND _ort_tried "an installed development package in ${_old}")
  else()
    list(APPEND _ort_tried "no installed onnxruntime development package")
  endif()
endif()

# 3. The per-user cache.
if(NOT OrtHeaders_ROUTE AND EXISTS "${_ort_cache}/onnxruntime_cxx_api.h")
  set(OrtHeaders_INCLUDE_DIR "${_ort_cache}")
  set(OrtHeaders_ROUTE "the per-user cache")
endif()

# 4. The official release archive.
if(NOT OrtHeaders_ROUTE)
  _ort_new_staging(_staging)
  set(_tgz "${_staging}/${_ort_archive}.tgz")
  file(DOWNLOAD "${_ort_url}" "${_tgz}" TIMEOUT 60 INACTIVITY_TIMEOUT 15 STATUS _status)
  list(GET _status 1 _reason)
  list(GET _status 0 _rc)
  if(_rc EQUAL 0)
    file(SHA256 "${_tgz}" _sha256)
    if(NOT _sha256 STREQUAL _ort_sha256)
      set(_reason "SHA256 ${_sha256}, expected ${_ort_sha256}")
    endif()
  endif()
  if(_rc EQUAL 0 AND _sha256 STREQUAL _ort_sha256)
    file(ARCHIVE_EXTRACT INPUT "${_tgz}" DESTINATION "${_staging}"
         PATTERNS "${_ort_archive}/include")
    _ort_store_in_cache("${_staging}/${_ort_archive}/include" "${_staging}")
    set(OrtHeaders_ROUTE "the official onnxruntime ${_ort_version} release archive")
  else()
    file(REMOVE_RECURSE "${_staging}")
    list(APPEND _ort_tried "release archive: ${_reason}")
  endif()
endif()

# 5. Debian 13's libonnxruntime-dev.
if(NOT OrtHeaders_ROUTE)
  if(EXISTS /etc/debian_version)
    _ort_new_staging(_staging)
    execute_process(
      COMMAND sh "${CMAKE_CURRENT_LIST_DIR}/fetch_debian_ort_headers.sh" "${_staging}/include"
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err TIMEOUT 300
      OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE)
    if(_rc EQUAL 0)
      _ort_store_in_cache("${_staging}/include" "${_staging}")
      set(OrtHeaders_ROUTE "Debian 13 (trixie) ${_out}")
    else()
      file(REMOVE_RECURSE "${_staging}")
      list(APPEND _ort_tried "Debian trixie libonnxruntime-dev: ${_err} (exit status: ${_rc})")
    endif()
  else()
    list(APPEND _ort_tried "Debian trixie libonnxruntime-dev: not a Debian system")
  endif()
endif()

if(OrtHeaders_ROUTE AND NOT OrtHeaders_INCLUDE_DIR)  # fetched just now
  if(EXISTS "${_ort_cache}/onnxruntime_cxx_api.h")
    set(OrtHeaders_INCLUDE_DIR "${_ort_cache}")
  else()
    list(APPEND _ort_tried "${OrtHeaders_ROUTE}: the headers could not be moved to ${_ort_cache}")
  endif()
endif()

if(OrtHeaders_INCLUDE_DIR)
  _ort_api_version("${OrtHeaders_INCLUDE_DIR}" OrtHeaders_API_VERSION)
endif()

string(REPLACE ";" "\n  " _ort_tried "${_ort_tried}")
string(CONCAT _ort_help
       "onnxruntime's C/C++ headers (1.21 or newer) were not found. Tried:\n  ${_ort_tried}\n"
       "Provide them with the environment variable ONNXRUNTIME_INCLUDE_DIR (or the CMake "
       "variable of that name) set to the directory holding onnxruntime_cxx_api.h, e.g. the "
       "include/ folder of the onnxruntime ${_ort_version} release archive, then build again.")
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(
  OrtHeaders REQUIRED_VARS OrtHeaders_INCLUDE_DIR OrtHeaders_API_VERSION
  REASON_FAILURE_MESSAGE "${_ort_help}")

if(OrtHeaders_FOUND)
  if(OrtHeaders_API_VERSION LESS 21)
    message(FATAL_ERROR "onnxruntime headers in ${OrtHeaders_INCLUDE_DIR} are API "
                        "${OrtHeaders_API_VERSION}; HasteConv needs 21 (onnxruntime 1.21) or newer.")
  endif()
  message(STATUS "onnxruntime headers (API ${OrtHeaders_API_VERSION}) from "
                 "${OrtHeaders_ROUTE}: ${OrtHeaders_INCLUDE_DIR}")
  if(NOT TARGET OrtHeaders::OrtHeaders)
    add_library(OrtHeaders::OrtHeaders INTERFACE IMPORTED)
    set_target_properties(OrtHeaders::OrtHeaders PROPERTIES
                          INTERFACE_INCLUDE_DIRECTORIES "${OrtHeaders_INCLUDE_DIR}")
  endif()
endif()
