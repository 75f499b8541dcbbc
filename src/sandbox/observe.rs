//! What the domain reports as it works. The server plugs its Prometheus metrics in; tests and
//! tools that want none use [`Unobserved`]. The domain never reaches for a global.

use std::fmt::Debug;
use std::time::Duration;

/// Receives the domain's measurements. Every method defaults to doing nothing.
pub trait Observer: Send + Sync + Debug + 'static {
    /// `bytes` of a client's input were written to an exec'd process's stdin.
    fn exec_input(&self, bytes: usize) {
        let _ = bytes;
    }
    /// `bytes` of an exec'd process's output were sent to its client.
    fn exec_output(&self, bytes: usize) {
        let _ = bytes;
    }
    /// An exec's first output byte went out `after` its request arrived.
    fn exec_first_output(&self, after: Duration) {
        let _ = after;
    }
}

/// An [`Observer`] that records nothing.
#[derive(Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {}
