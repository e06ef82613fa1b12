//! Progress reporting: bars on a terminal, JSON lines for scripts
//! (`--progress json`), or nothing.
//!
//! Library code only ever asks for a bar ([`bytes`], [`count`]) and moves
//! it; how it is shown is decided here, once, by the CLI ([`set_mode`]).
//! In JSON mode each bar is drawn by indicatif into [`JsonLines`], which
//! writes one `{"event":"progress",...}` object per line on stderr,
//! throttled to four a second. These are samples: the last one may be
//! short of the total. The CLI adds the `started` and `done` events around
//! a command with [`event`]; `done` is what says the work is complete.

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bars on a terminal, nothing otherwise (the default).
    Bars = 0,
    /// One JSON object per line on stderr.
    Json = 1,
    /// Nothing (`-q`).
    Off = 2,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Bars as u8);

/// At most this often a bar prints a progress line in JSON mode.
const JSON_INTERVAL: Duration = Duration::from_millis(250);

pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        0 => Mode::Bars,
        1 => Mode::Json,
        _ => Mode::Off,
    }
}

/// Turn bars off (`-q`); they are also off when stderr is not a terminal.
pub fn set_enabled(on: bool) {
    set_mode(if on { Mode::Bars } else { Mode::Off });
}

/// Print one JSON event line on stderr, in JSON mode only.
pub fn event(value: serde_json::Value) {
    if mode() == Mode::Json {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{value}");
        let _ = err.flush();
    }
}

/// A byte-counting bar.
pub fn bytes(total: u64, message: &str) -> ProgressBar {
    bar(
        total,
        message,
        "bytes",
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
}

/// A counting bar (items, not bytes).
pub fn count(total: u64, message: &str) -> ProgressBar {
    bar(
        total,
        message,
        "items",
        "{msg} [{bar:30}] {pos}/{len} eta {eta}",
    )
}

fn bar(total: u64, message: &str, unit: &'static str, template: &str) -> ProgressBar {
    match mode() {
        Mode::Json => json_bar(total, message, unit),
        Mode::Bars if std::io::stderr().is_terminal() => {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message(message.to_string());
            bar
        }
        _ => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden()),
    }
}

/// A bar that renders itself as a JSON progress event: `task` is the bar's
/// message, and the counters are `bytes_done`/`bytes_total` or
/// `items_done`/`items_total` after `unit`.
fn json_bar(total: u64, message: &str, unit: &'static str) -> ProgressBar {
    let task = message.to_string();
    let render = move |state: &ProgressState, out: &mut dyn std::fmt::Write| {
        let mut line = serde_json::Map::new();
        line.insert("event".into(), "progress".into());
        line.insert("task".into(), task.clone().into());
        line.insert(format!("{unit}_done"), state.pos().into());
        line.insert(format!("{unit}_total"), state.len().unwrap_or(0).into());
        let line = serde_json::Value::Object(line);
        // indicatif moves a finished bar to its total, also when it is
        // dropped on an error: that position would be a false 100%.
        if !state.is_finished() {
            let _ = write!(out, "{line}");
        }
    };
    let style = ProgressStyle::with_template("{json}")
        .expect("static template")
        .with_key("json", render);
    // indicatif's own limit is looser (it allows bursts); JsonLines enforces ours.
    let target = ProgressDrawTarget::term_like_with_hz(Box::new(JsonLines::default()), 4);
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(style);
    bar
}

/// A pretend terminal that turns each drawn bar into one line on stderr.
/// indicatif draws by clearing lines, writing the bar text and padding;
/// only the text matters here.
#[derive(Debug, Default)]
struct JsonLines {
    state: Mutex<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    pending: String,
    last: String,
    printed_at: Option<Instant>,
}

impl JsonLines {
    fn emit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let text = std::mem::take(&mut s.pending);
        let line = text.trim();
        let due = s.printed_at.is_none_or(|t| t.elapsed() >= JSON_INTERVAL);
        if line.is_empty() || line == s.last || !due {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
        s.last = line.to_string();
        s.printed_at = Some(Instant::now());
    }
}

impl indicatif::TermLike for JsonLines {
    fn width(&self) -> u16 {
        // Wide enough that no event wraps; the padding is trimmed anyway.
        1024
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pending.push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .clear();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.emit();
        Ok(())
    }
}
