//! Config text and PERSONA_* overrides: a configuration or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona::config::{Config, Settings};

fuzz_target!(|input: (&str, Vec<(String, String)>, u8)| {
    let (text, env, process) = input;
    let env = env
        .into_iter()
        .map(|(k, v)| (format!("PERSONA_{k}"), v))
        .take(8);
    let Ok(config) = Config::parse(text, "fuzz", env) else {
        return;
    };
    let _ = config.to_toml();
    if let Ok(settings) = Settings::from_config(&config) {
        let _ = settings.for_process(&config.cluster, process as usize % 4, None);
    }
});
