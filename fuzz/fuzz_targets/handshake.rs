//! The HTTP upgrade parser must never panic, and an upgrade's head length must lie
//! within the input (the rest is handed to the WebSocket layer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman::http::{parse, Request, MAX_REQUEST};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Request::Upgrade { accept, consumed } => {
            assert!(consumed <= data.len() && consumed <= MAX_REQUEST);
            assert_eq!(accept.len(), 28, "base64 of a SHA-1");
        }
        Request::Partial => assert!(data.len() < MAX_REQUEST),
        Request::Plain { .. } | Request::Bad(_) => {}
    }
});
