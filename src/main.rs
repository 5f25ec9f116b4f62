//! The `discus` command.

fn main() -> std::process::ExitCode {
    discus::cli::run()
}
