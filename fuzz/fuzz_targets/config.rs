//! Config text → `Config`: whatever the text, `Config::parse` returns
//! (it must never panic: `wsgate check` and a SIGHUP reload run it on
//! whatever the file holds), a refusal lists at least one problem, each on
//! a line the text has, the same text gives the same answer twice, and an
//! accepted config's warnings can be listed.
//!
//! Input: the TOML text. Relative paths (certificates, keys) resolve
//! against the repository root, so the seeds can name `certs/localhost.*`.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wsgate::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match Config::parse(text, &base) {
        Ok(config) => {
            let _ = config.warnings();
            assert!(
                Config::parse(text, &base).is_ok(),
                "accepted once, refused the second time"
            );
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            let lines = text.lines().count() + 1;
            for problem in &problems {
                if let Some(line) = problem.line {
                    assert!(
                        line >= 1 && line <= lines,
                        "problem on line {line} of {lines}: {problem}"
                    );
                }
            }
            let again = Config::parse(text, &base).err();
            assert_eq!(
                again.as_ref(),
                Some(&problems),
                "the same text gave other problems"
            );
        }
    }
});
