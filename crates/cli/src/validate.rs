//! `respawn validate`: the spec parser, offline.

use std::path::PathBuf;
use std::process::ExitCode;

use respawn_core::spec;

pub fn run(files: &[PathBuf], print: bool) -> ExitCode {
    let mut bad = 0;
    for file in files {
        match spec::parse_file(file) {
            Ok(s) => {
                if print {
                    let redacted = s.redacted();
                    match serde_json::to_string_pretty(&redacted) {
                        Ok(json) => println!("{json}"),
                        Err(e) => eprintln!("{}: cannot print: {e}", file.display()),
                    }
                } else {
                    println!("{}: ok ({})", file.display(), s.name);
                }
            }
            Err(e) => {
                bad += 1;
                for err in &e.errors {
                    eprintln!("{}: {err}", file.display());
                }
            }
        }
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        if files.len() > 1 {
            eprintln!("{bad} of {} specs invalid", files.len());
        }
        ExitCode::FAILURE
    }
}
