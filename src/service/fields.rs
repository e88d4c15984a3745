//! Serde helpers for config values that several backends' config tables share.

/// Serde for an optional value written as a string, where "" means none (TOML has no null):
/// `#[serde(with = "empty_is_none")]`.
pub mod empty_is_none {
    use serde::de::IntoDeserializer;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => v.serialize(serializer),
            None => serializer.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        T::deserialize(IntoDeserializer::<D::Error>::into_deserializer(text)).map(Some)
    }
}

/// Checks a number of seconds or frames per second: finite and 0 or more.
pub fn non_negative(value: f64, key: &str) -> Result<(), String> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(format!("{key} = {value}: give a number ≥ 0"))
    }
}
