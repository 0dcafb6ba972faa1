#![no_main]
// See capgate_fuzz::graphql_request for what is called and asserted.
libfuzzer_sys::fuzz_target!(|data: &[u8]| capgate_fuzz::graphql_request(data));
