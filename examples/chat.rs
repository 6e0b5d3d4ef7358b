//! A chat room service on the client library: it enables the room for clients (EPUB,
//! ESUB), keeps the last 100 messages and answers `REQ chat.history` with them.
//!
//! ```sh
//! cargo run --release                      # prints a service key and a client key
//! MM_KEY=<service key> cargo run --example chat
//! # then open http://127.0.0.1:8765/demo?key=<client key> in two browser tabs
//! ```
//!
//! Environment: `MM_URL` (default `ws://127.0.0.1:8765/`), `MM_KEY` (a service key),
//! `CHAT_ROOM` (default `chat`).

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use middleman::client::{Client, Error, Message, Reply, Service};

const KEEP: usize = 100;

fn main() -> ExitCode {
    let url = std::env::var("MM_URL").unwrap_or_else(|_| "ws://127.0.0.1:8765/".into());
    let Ok(key) = std::env::var("MM_KEY") else {
        eprintln!("chat: set MM_KEY to a service key");
        return ExitCode::from(2);
    };
    let room = std::env::var("CHAT_ROOM").unwrap_or_else(|_| "chat".into());
    match run(&url, &key, &room) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(url: &str, key: &str, room: &str) -> Result<(), Error> {
    let history: Arc<Mutex<VecDeque<String>>> = Arc::default();

    // One connection records the room: services may subscribe to anything.
    let mut recorder = Client::connect(url, key)?;
    recorder.enable_publish(room)?;
    recorder.enable_subscribe(room)?;
    recorder.subscribe(room)?;
    let kept = Arc::clone(&history);
    let recording = std::thread::spawn(move || -> Result<(), Error> {
        loop {
            let m = recorder.recv()?;
            if m.cmd == "PUB" {
                let mut h = kept.lock().unwrap_or_else(|p| p.into_inner());
                if h.len() == KEEP {
                    h.pop_front();
                }
                h.push_back(line(&m));
            }
        }
    });

    // Another answers history requests.
    let target = format!("{room}.history");
    let mut svc = Service::connect(url, key)?;
    svc.listen(&target)?;
    eprintln!("chat: room {room:?} open; history at REQ {target}");
    svc.respond(&target, |_req: &Message| {
        let h = history.lock().unwrap_or_else(|p| p.into_inner());
        let lines: Vec<&str> = h.iter().map(String::as_str).collect();
        Reply::new(lines.join("\n")).header("Count", h.len().to_string())
    })?;
    recording
        .join()
        .unwrap_or_else(|_| Err(Error::Invalid("recorder panicked".into())))
}

/// One history line: `name<TAB>text`, line breaks in the text turned into spaces.
fn line(m: &Message) -> String {
    let name = m.header("Name").unwrap_or("anonymous");
    let text = m.body_text().replace(['\r', '\n', '\t'], " ");
    format!("{name}\t{text}")
}
