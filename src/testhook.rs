//! Crash-test hooks. With `STRATA_TEST_PAUSE=<step>` in the environment, a
//! process that reaches that named step prints `STRATA_TEST_PAUSED <step>` on
//! stderr and stops there, so that a test can `kill -9` it at exactly that
//! point. Without the variable this is one environment lookup.

use std::io::Write;

pub fn pause(step: &str) {
    if std::env::var_os("STRATA_TEST_PAUSE").is_some_and(|v| v == step) {
        let mut err = std::io::stderr();
        let _ = writeln!(err, "STRATA_TEST_PAUSED {step}");
        let _ = err.flush();
        loop {
            std::thread::park();
        }
    }
}
