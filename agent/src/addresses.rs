//! Guest-RAM virtual addresses are kept out of what memfabric says (logs, error texts in
//! `/v1/status` and `/v1/recommendations`) unless the operator asks for them
//! (`--expose-addresses`): they tell where a VMM mapped a tenant's memory, which helps an
//! attacker defeat its address-space randomisation.

use std::cell::Cell;

thread_local! {
    /// Whether the serialization running on this thread may show guest addresses. Off
    /// unless [`exposing`] turns it on: a document serialized anywhere else hides them.
    static EXPOSE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a serialization) with guest addresses shown when `expose`, hidden otherwise.
pub fn exposing<T>(expose: bool, f: impl FnOnce() -> T) -> T {
    /// Puts the previous setting back, also when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXPOSE.set(self.0);
        }
    }
    let _restore = Restore(EXPOSE.replace(expose));
    f()
}

/// For `#[serde(skip_serializing_if = "crate::addresses::hidden")]` on a field that holds
/// a guest-RAM address: the field is left out of every document unless it is serialized
/// inside [`exposing`]`(true, ..)`. The redaction belongs to the field's declaration, so a
/// renamed or new address field cannot leak by being missed at the API's edge.
pub fn hidden(_address: &u64) -> bool {
    !EXPOSE.get()
}

/// A span of a VMM's guest-RAM addresses as documents serve it: the addresses only inside
/// [`exposing`]`(true, ..)` (0 when read back otherwise), the size always. Flattened into
/// the documents that carry one, so the fields stay `start`, `end` and `bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestSpan {
    #[serde(default, skip_serializing_if = "hidden")]
    pub start: u64,
    #[serde(default, skip_serializing_if = "hidden")]
    pub end: u64,
    /// `end - start`, always served.
    #[serde(default)]
    pub bytes: u64,
}

impl GuestSpan {
    pub fn new(start: u64, end: u64) -> GuestSpan {
        GuestSpan {
            start,
            end,
            bytes: end.saturating_sub(start),
        }
    }
}

/// `text` with every hexadecimal number of five digits or more (`0x7f3a...`) replaced by
/// `0x…`: user-space addresses, never PIDs, sizes in MiB or errno values, which memfabric
/// prints in decimal.
pub fn hide(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'0' && bytes.get(i + 1) == Some(&b'x') {
            let digits = bytes[i + 2..]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            if digits >= 5 {
                out.push_str("0x…");
                i += 2 + digits;
                continue;
            }
        }
        let ch = text[i..].chars().next().expect("inside the text");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// [`hide`] unless `expose`.
pub fn shown(text: &str, expose: bool) -> String {
    if expose { text.to_owned() } else { hide(text) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_go_and_everything_else_stays() {
        assert_eq!(
            hide("0x7f3a12340000-0x7f3a12540000 is not entirely mapped in PID 4242"),
            "0x…-0x… is not entirely mapped in PID 4242"
        );
        assert_eq!(
            hide("code at 0x55d1c0ffee: é 0x1f 0x"),
            "code at 0x…: é 0x1f 0x"
        );
        assert_eq!(shown("at 0x7f0000000000", true), "at 0x7f0000000000");
        assert_eq!(hide(""), "");
    }

    #[derive(serde::Serialize)]
    struct Range {
        #[serde(skip_serializing_if = "hidden")]
        first: u64,
        bytes: u64,
    }

    #[test]
    fn address_fields_are_hidden_unless_a_serialization_exposes_them() {
        let r = Range {
            first: 0x7f00_0000_0000,
            bytes: 4096,
        };
        let plain = serde_json::to_string(&r).unwrap();
        assert_eq!(plain, r#"{"bytes":4096}"#);
        let shown = exposing(true, || serde_json::to_string(&r).unwrap());
        assert!(shown.contains("139637976727552"), "{shown}");
        // The setting ends with the call, and nested calls put theirs back.
        assert_eq!(serde_json::to_string(&r).unwrap(), plain);
        let inner = exposing(true, || {
            exposing(false, || serde_json::to_string(&r).unwrap())
        });
        assert_eq!(inner, plain);
    }
}
