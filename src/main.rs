/// mimalloc: per message the daemon makes and frees many small allocations (strings, Lua
/// values, tasks); BENCHMARKS.md has the measured difference with glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    luamilter::cli::main()
}
