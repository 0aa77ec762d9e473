//! The process's heap: jemalloc, for a daemon that holds a big policy for months and
//! builds a new one on every reload.
//!
//! glibc's malloc gave the daemon's resident memory a spread of 10 MiB between runs of the
//! same benchmark: the heaps of the threads that parse and compile a policy keep the pages
//! of their top chunk after the policy they made is freed, and `malloc_trim` does not give
//! those back. jemalloc keeps freed pages in extents of its own, and
//! [`release_free_pages`] gives back all of them.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read before `main`. One arena: with an arena per thread (and per
/// core), each keeps pages of its own partly filled; the daemon allocates little outside a
/// reload, so its threads lose nothing by sharing one (2 MiB less resident at 100k devices).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a NUL-terminated string that lives as long as the program.
    Some(unsafe { &*c"narenas:1".as_ptr() });

/// Gives the pages that freed memory left back to the kernel now, rather than after
/// jemalloc's decay time (10 s), for after a big build is freed (a policy's parse, a
/// compilation, a walk over the flow table).
pub fn release_free_pages() {
    // MALLCTL_ARENAS_ALL (4096): every arena.
    const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: a command that takes and returns nothing, named by a NUL-terminated string.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if failed != 0 {
        tracing::debug!(error = failed, "jemalloc's purge failed");
    }
}
