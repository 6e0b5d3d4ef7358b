//! Every message decoded from the input, re-encoded with `encode_into`, decodes back to an
//! equal message (same cmd, target, headers and body), and encoding is a fixed point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman::protocol::{encode_into, Packet};
use middleman_fuzz::{huge_limits, limits_and_stream, run, Msg, Outcome};

fn encode(m: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(
        &mut out,
        &m.cmd,
        &m.target,
        m.headers.iter().map(|(n, v)| (&n[..], &v[..])),
        &m.body,
    );
    out
}

fuzz_target!(|data: &[u8]| {
    let (limits, stream) = limits_and_stream(data);
    let (outcomes, _) = run(limits, [stream]);
    for outcome in &outcomes {
        let Outcome::Message(m) = outcome else {
            continue;
        };
        let wire = encode(m);
        assert!(wire.ends_with(b"\r\n.\r\n"));
        let (back, partial) = run(huge_limits(), [&wire[..]]);
        assert_eq!(back, [Outcome::Message(m.clone())], "wire {wire:?}");
        assert!(!partial);
        // Encoding what was decoded from our own output gives the same bytes.
        let Outcome::Message(again) = &back[0] else {
            unreachable!()
        };
        assert_eq!(encode(again), wire);
        // The shared packet carries exactly those bytes.
        let p = Packet::build(|b| b.extend_from_slice(&wire));
        assert_eq!(p.payload(), &wire[..]);
        assert_eq!(p.is_text(), std::str::from_utf8(&wire).is_ok());
    }
});
