//! The `strata` command. Everything lives in `cli/`, a thin layer of
//! argument parsing and printing over the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
