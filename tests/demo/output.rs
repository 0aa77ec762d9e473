//! How the demo prints: one line per thing that happens, stamped with the time since the
//! demo started; ANSI colours and arrows only when asked for (a terminal without NO_COLOR).

use std::time::Instant;

pub const BOLD: &str = "1";
pub const DIM: &str = "2";
pub const GREEN: &str = "1;32";
pub const RED: &str = "1;31";
pub const YELLOW: &str = "1;33";
pub const MAGENTA: &str = "1;35";
pub const CYAN: &str = "1;36";

/// Widths of the columns of a flow line.
const FLOW_WIDTH: usize = 38;
const NOTE_WIDTH: usize = 30;

pub struct Printer {
    color: bool,
    start: Instant,
}

impl Printer {
    pub fn new(color: bool, start: Instant) -> Printer {
        Printer { color, start }
    }

    /// Seconds since the demo started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn paint(&self, style: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{style}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn arrow(&self) -> &'static str {
        if self.color {
            "→"
        } else {
            "->"
        }
    }

    fn stamp(&self) -> String {
        self.paint(DIM, &format!("[{:>4.1}s]", self.elapsed()))
    }

    /// `[ 2.1s] text`
    pub fn line(&self, text: &str) {
        println!("{} {text}", self.stamp());
    }

    /// A line of less importance (dimmed).
    pub fn note(&self, text: &str) {
        println!("{} {}", self.stamp(), self.paint(DIM, text));
    }

    /// `[ 2.1s] <flow padded> <note padded> <verdict>`
    pub fn flow(&self, flow: &str, note: &str, verdict: &str) {
        println!(
            "{} {} {} {verdict}",
            self.stamp(),
            pad(flow, FLOW_WIDTH),
            pad(note, NOTE_WIDTH)
        );
    }

    /// An act of the story: a blank line and a header.
    pub fn act(&self, title: &str) {
        let rule = if self.color { "──" } else { "--" };
        println!();
        println!("{}", self.paint(BOLD, &format!("{rule} {title} {rule}")));
    }

    /// A line without a time stamp (the summary).
    pub fn plain(&self, text: &str) {
        println!("{text}");
    }
}

/// `text` padded with spaces to `width` characters (not bytes: the arrow is one).
fn pad(text: &str, width: usize) -> String {
    let n = text.chars().count();
    if n >= width {
        text.to_string()
    } else {
        format!("{text}{}", " ".repeat(width - n))
    }
}
