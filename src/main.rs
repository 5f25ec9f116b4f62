//! The `discus` command.
//!
//! Its allocator is jemalloc, which gives freed memory back to the kernel within a second (the
//! settings built in are in .cargo/config.toml). With glibc's, an agent kept most of what a cold
//! start of thousands of objects had used — reports and list answers of megabytes, from several
//! threads — and held 65–81 MiB at all Ready against 48–59 now, over the chart's 64 MiB request
//! (docs/performance.md). Programs discus runs (tgtd, qemu-img) keep their own allocator.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    discus::cli::run()
}
