//! Crash-test hooks. With `STRATA_TEST_PAUSE=<step>` in the environment, a
//! process that reaches that named step prints `STRATA_TEST_PAUSED <step>` on
//! stderr and waits until its standard input yields a line or ends, so that
//! a test can `kill -9` it at exactly that point, or let it go on. Without
//! the variable this is one environment lookup.

use std::io::{BufRead, Write};

pub fn pause(step: &str) {
    if std::env::var_os("STRATA_TEST_PAUSE").is_some_and(|v| v == step) {
        let mut err = std::io::stderr();
        let _ = writeln!(err, "STRATA_TEST_PAUSED {step}");
        let _ = err.flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
}
