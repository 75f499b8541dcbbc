//! The local terminal: raw mode for `exec -t` and the window size.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Puts stdin's terminal into raw mode (no echo, no line editing, no local signals) and puts
/// the saved settings back when dropped: on return, on error and while a panic unwinds.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Switches stdin's terminal to raw mode. Fails when stdin is not a terminal.
    pub fn enable() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: output already written by the remote side is shown before echo returns.
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The window size (rows, columns) of the first of stdin, stdout and stderr that is a
/// terminal; None when none is, or it reports 0×0.
pub fn size() -> Option<(u16, u16)> {
    let fds = [
        (std::io::stdin().is_terminal(), std::io::stdin().as_raw_fd()),
        (
            std::io::stdout().is_terminal(),
            std::io::stdout().as_raw_fd(),
        ),
        (
            std::io::stderr().is_terminal(),
            std::io::stderr().as_raw_fd(),
        ),
    ];
    let (_, fd) = fds.into_iter().find(|(tty, _)| *tty)?;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points to a
    // live, properly aligned `libc::winsize` owned by this frame; `fd` is one of the process's
    // standard descriptors, open for the life of the process.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}
