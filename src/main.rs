//! The `discus` command.
//!
//! Its allocator is jemalloc (the feature `jemalloc`, on by default), which gives freed memory
//! back to the kernel within a second (the settings built in are in .cargo/config.toml). With
//! glibc's, an agent kept much of what a cold start of thousands of objects had used — reports
//! and list answers of megabytes, from several threads — and held 64–82 MiB at all Ready against
//! 44–63 now, the chart asking for 64 (docs/performance.md). Programs discus runs (tgtd,
//! qemu-img) keep their own allocator.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    discus::cli::run()
}
