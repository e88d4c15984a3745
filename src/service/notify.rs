//! systemd's notification protocol (`sd_notify`), through the `sd-notify` crate: READY=1,
//! STATUS=, WATCHDOG=1, STOPPING=1 as datagrams to `$NOTIFY_SOCKET`. Without systemd (no
//! variable) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// The service's side of systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC` (honoured when `WATCHDOG_PID` is unset or this process);
    /// `NOTIFY_SOCKET` is read at each notification.
    pub fn from_env() -> Self {
        Notifier {
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// The watchdog timeout systemd expects pings within (`WatchdogSec=`), if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification such as "READY=1" or "STATUS=..."; a failure is logged (debug).
    pub fn notify(&self, text: &str) {
        let state = match text {
            "READY=1" => NotifyState::Ready,
            "STOPPING=1" => NotifyState::Stopping,
            "WATCHDOG=1" => NotifyState::Watchdog,
            other => match other.strip_prefix("STATUS=") {
                Some(status) => NotifyState::Status(status),
                None => NotifyState::Custom(other),
            },
        };
        if let Err(e) = sd_notify::notify(&[state]) {
            log::debug!("sd_notify {text:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn sends_to_the_notify_socket() {
        let path = std::env::temp_dir().join(format!("samrt-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        // The variable is process-wide; only this test sets it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        let notifier = Notifier::from_env();
        notifier.notify("READY=1");
        notifier.notify("STATUS=frames 3 captured");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=frames 3 captured\n");
        std::fs::remove_file(&path).unwrap();
    }
}
