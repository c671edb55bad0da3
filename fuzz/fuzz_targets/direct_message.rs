#![no_main]
use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| quva_client::__fuzz::direct_message(data));
