//! The kubectl plugin: `kubectl sluice get NAME` is `sluice rollout get NAME`, and
//! `kubectl sluice policy status NAME` is `sluice policy status NAME`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let group = match args.first().map(String::as_str) {
        Some("policy") => {
            args.remove(0);
            "policy"
        }
        _ => "rollout",
    };
    let argv = ["sluice".to_owned(), group.to_owned()]
        .into_iter()
        .chain(args);
    let cli = sluice::cli::Cli::parse_from(argv);
    match sluice::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            err.exit_code()
        }
    }
}
