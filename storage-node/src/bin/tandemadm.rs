//! tandemadm: drbdadm's verbs for tandemd, over its Unix control socket.
//!
//! ```text
//! tandemadm [-c FILE] [-s SOCKET] VERB [OPTIONS] RESOURCE|all
//! ```
//! The socket comes from `-s`, else `$TANDEM_CONTROL_SOCKET`, else /run/tandem/tandemd.sock.
//! `-c FILE` is accepted for drbdadm compatibility (tandemd reads the configuration it was
//! started with). Output and exit codes follow drbdadm's.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use storage_node::constants::{CONTROL_SOCKET_DEFAULT, CONTROL_SOCKET_ENV};
use storage_node::control::{self, Reply, exit};

const USAGE: &str = "usage: tandemadm [-c FILE] [-s SOCKET] VERB [OPTIONS] RESOURCE|all
verbs: create-md [--force], up, down, attach, detach, connect [--discard-my-data], disconnect,
       primary [--force], secondary, adjust, invalidate, invalidate-remote, pause-sync,
       resume-sync, new-current-uuid [--clear-bitmap], outdate, wait-connect [--timeout S],
       wait-sync [--timeout S], role, cstate, dstate, show-gi, dump,
       status [--verbose] [--statistics], events2 [--now] [--statistics],
       verify [--start SECTOR]";

/// Ends a progress bar drawn in place, so the next line starts on its own.
fn end_progress(shown: &mut bool) {
    if std::mem::take(shown) {
        eprintln!();
    }
}

fn dump_local(file: &str, resource: &str) -> i32 {
    let loaded = match storage_node::loader::load(std::path::Path::new(file)) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{error}");
            return exit::CONFIG_INVALID;
        }
    };
    for (path, error) in &loaded.broken {
        eprintln!("{error} (skipped {})", path.display());
    }
    let mut found = false;
    for r in &loaded.config.resources {
        if resource == "all" || r.name == resource {
            found = true;
            print!("{}", storage_node::dump::render(r));
        }
    }
    if !found && resource != "all" {
        eprintln!("'{resource}' not defined in your config.");
        return exit::CONFIG_INVALID;
    }
    if loaded.broken.is_empty() { exit::SUCCESS } else { exit::CONFIG_INVALID }
}

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let mut socket =
        std::env::var(CONTROL_SOCKET_ENV).unwrap_or_else(|_| CONTROL_SOCKET_DEFAULT.into());
    let mut config_file: Option<String> = None;
    let mut words = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return exit::SUCCESS;
            }
            "-c" | "--config" | "-s" | "--socket" => {
                let Some(value) = argv.next() else {
                    eprintln!("{arg} needs a value\n{USAGE}");
                    return exit::USAGE;
                };
                if arg == "-s" || arg == "--socket" {
                    socket = value;
                } else {
                    config_file = Some(value);
                }
            }
            _ => words.push(arg),
        }
    }
    let request = match control::parse_command(&words) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("{error}\n{USAGE}");
            return exit::USAGE;
        }
    };
    // `dump` with -c reads the file here, like drbdadm, without asking tandemd.
    if request.verb == storage_node::control::Verb::Dump
        && let Some(file) = config_file
    {
        return dump_local(&file, &request.resource);
    }
    let mut stream = match UnixStream::connect(&socket) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!(
                "cannot reach tandemd at {socket}: {error}; is it running? (start tandemd, or \
                 point -s / ${CONTROL_SOCKET_ENV} at its control socket)"
            );
            return exit::EXEC_ERROR;
        }
    };
    if let Err(error) = stream.write_all(control::encode_request(&request).as_bytes()) {
        eprintln!("sending to tandemd: {error}");
        return exit::EXEC_ERROR;
    }
    let stdout = std::io::stdout();
    let mut progress_shown = false;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        match control::decode_reply(&line) {
            Ok(Reply::Line { text }) => {
                let mut out = stdout.lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
            Ok(Reply::Error { text }) => {
                end_progress(&mut progress_shown);
                eprintln!("{text}");
            }
            Ok(Reply::Progress { text }) => {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    // Redraw in place on a terminal.
                    eprint!("\r{text}\x1b[K");
                    progress_shown = true;
                } else {
                    eprintln!("{text}");
                }
            }
            Ok(Reply::Done { exit_code }) => {
                end_progress(&mut progress_shown);
                return exit_code;
            }
            Err(error) => {
                eprintln!("tandemd sent a bad reply: {error}");
                return exit::EXEC_ERROR;
            }
        }
    }
    eprintln!("tandemd closed the connection before answering (did it crash?)");
    exit::EXEC_ERROR
}
