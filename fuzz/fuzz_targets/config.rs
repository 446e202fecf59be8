//! A config file is operator input, but a typo must end in an error that names the key, never a panic: any
//! TOML laid over the defaults either fails to load or validate, or gives a config whose policies can be read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayhub::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml_over_defaults(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    for channel in ["chat:room", "prices:BTC", "news", "x:y:z"] {
        let _ = config.policy(channel);
    }
});
