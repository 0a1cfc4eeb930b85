fn main() -> std::process::ExitCode {
    luamilter::cli::main()
}
