//! Fuzz target: untrusted bytes as envelope (see gleaner::fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gleaner::fuzz::decode_envelope(data);
});
