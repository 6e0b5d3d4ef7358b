//! The decoder must never panic, whatever the bytes and limits, and every outcome must
//! keep §2's promises (checked in `middleman_fuzz::drain`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman_fuzz::{limits_and_stream, run, Outcome};

fuzz_target!(|data: &[u8]| {
    let (limits, stream) = limits_and_stream(data);
    let (outcomes, _partial) = run(limits, [stream]);
    if let Some(i) = outcomes.iter().position(|o| matches!(o, Outcome::Close(_))) {
        assert_eq!(i + 1, outcomes.len(), "a close is the last outcome");
    }
    // Every complete message took at least "X t\n.\n" (6 bytes).
    assert!(outcomes.len() <= stream.len() / 6 + 1);
});
