//! `backend = "rppal"`: a Raspberry Pi GPIO pin through rppal, interrupt on both edges.

use std::sync::mpsc::SyncSender;

use rppal::gpio::{Error, Event, Gpio, InputPin, Trigger};

use super::{Button, ButtonConfig, ButtonEdge, GPIO_GROUP_FIX};

/// The input pin with its interrupt; rppal's poll thread runs the callback.
pub(super) struct RppalButton {
    pin: InputPin,
}

/// The edge a Raspberry Pi interrupt event stands for.
pub(super) fn edge_of(event: &Event, active_low: bool) -> Option<ButtonEdge> {
    let high = match event.trigger {
        Trigger::RisingEdge => true,
        Trigger::FallingEdge => false,
        Trigger::Disabled | Trigger::Both => return None,
    };
    Some(ButtonEdge {
        pressed: high != active_low,
        at: event.timestamp,
    })
}

/// What went wrong, and the fix.
pub(super) fn error_message(error: &Error, pin: u32) -> String {
    let what = format!("button backend `rppal` (BCM pin {pin})");
    match error {
        Error::UnknownModel => format!(
            "{what}: this is not a Raspberry Pi (rppal cannot identify the model); on other \
             boards use `backend = \"cdev\"` (build with `--features gpio-cdev`)"
        ),
        Error::PermissionDenied(path) => {
            format!("{what}: permission denied opening {path}: {GPIO_GROUP_FIX}")
        }
        Error::PinUsed(_) => format!("{what}: the pin is already in use by samrt"),
        Error::PinNotAvailable(_) => format!(
            "{what}: this Raspberry Pi has no such GPIO pin (BCM numbers; the 40-pin header \
             has GPIO 2 to 27)"
        ),
        Error::Io(io) if io.raw_os_error() == Some(libc::EBUSY) => format!(
            "{what}: the pin is busy: another program or a kernel driver (a device-tree \
             overlay) holds it; stop it (`gpioinfo` shows the consumer) or pick another pin"
        ),
        Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            format!("{what}: permission denied: {GPIO_GROUP_FIX}")
        }
        Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => format!(
            "{what}: no GPIO device found ({io}): is this a Raspberry Pi with /dev/gpiomem \
             and /dev/gpiochip*?"
        ),
        other => format!("{what}: {other}"),
    }
}

impl RppalButton {
    pub(super) fn start(
        config: &ButtonConfig,
        edges: SyncSender<ButtonEdge>,
    ) -> Result<Self, String> {
        let message = |error: Error| error_message(&error, config.pin);
        let bcm = u8::try_from(config.pin).map_err(|_| message(Error::PinNotAvailable(u8::MAX)))?;
        let gpio = Gpio::new().map_err(message)?;
        let pin = gpio.get(bcm).map_err(message)?;
        let mut pin = if config.active_low {
            pin.into_input_pullup()
        } else {
            pin.into_input_pulldown()
        };
        let active_low = config.active_low;
        pin.set_async_interrupt(Trigger::Both, None, move |event: Event| {
            if let Some(edge) = edge_of(&event, active_low) {
                // Never block the interrupt thread: a full channel drops the edge.
                let _ = edges.try_send(edge);
            }
        })
        .map_err(message)?;
        Ok(RppalButton { pin })
    }
}

impl Drop for RppalButton {
    fn drop(&mut self) {
        // Stops and joins rppal's poll thread; dropping the pin then resets its bias.
        if let Err(error) = self.pin.clear_async_interrupt() {
            log::warn!("button: stopping the GPIO interrupt failed: {error}");
        }
    }
}

impl Button for RppalButton {}
