//! Every parser of outside input against arbitrary bytes (bounded property runs in CI; the
//! same functions are cargo-fuzz targets in fuzz/): a hostile command line, /proc or
//! tracefs text or config must give an answer or an error, never a panic, and what comes
//! out must be safe to print and label with.

use memfabric::{
    config::{FileConfig, Listen},
    host::inventory::{clean_name, identity_from_cmdline, qemu_memory},
    host::ksm::{KsmStat, vmstat_in},
    host::tracefs::parse_format,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cmdline_identity_is_printable_and_bounded(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        let id = identity_from_cmdline(&raw);
        if let Some(name) = id.name {
            prop_assert!(name.chars().count() <= 64);
            prop_assert!(!name.chars().any(|c| c.is_control()), "{name:?}");
            let bidi = name.chars().any(|c| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'));
            prop_assert!(!bidi, "bidi override in {:?}", name);
        }
        if let Some(uuid) = id.uuid {
            prop_assert_eq!(uuid.len(), 36);
            prop_assert!(uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        }
    }

    #[test]
    fn names_with_options_and_escapes_are_cleaned(name in "\\PC{0,80}", esc in "[\u{1b}\u{7}\u{202e}\r\n]{0,4}") {
        let cleaned = clean_name(&format!("{esc}{name}{esc}"));
        prop_assert!(cleaned.chars().count() <= 64);
        prop_assert!(!cleaned.chars().any(|c| c.is_control()));
    }

    #[test]
    fn qemu_memory_sizes_parse_or_refuse(words in proptest::collection::vec("[-=,a-zA-Z0-9]{0,12}", 0..6), n in 1u64..1_000_000) {
        let mut cmd: Vec<String> = words;
        let _ = qemu_memory(&cmd);
        cmd.extend(["-m".to_owned(), format!("{n}M")]);
        // The first -m wins; with none before, ours.
        if !cmd[..cmd.len() - 2].contains(&"-m".to_owned()) {
            prop_assert_eq!(qemu_memory(&cmd), Some(n << 20));
        }
        let huge = vec!["-m".to_owned(), format!("{}T", u64::MAX / 2)];
        let _ = qemu_memory(&huge);
    }

    #[test]
    fn tracefs_formats_parse_or_refuse(text in "\\PC{0,400}") {
        let _ = parse_format(&text);
    }

    #[test]
    fn tracefs_fields_round_trip(off in 0u32..4096, size in prop::sample::select(vec![1u32, 2, 4, 8]), name in "[a-z_]{1,16}") {
        let text = format!("name: x\nID: 1\nformat:\n\tfield:unsigned long {name};\toffset:{off};\tsize:{size};\tsigned:0;\n");
        let f = parse_format(&text).unwrap();
        let field = f.field(&name).unwrap();
        prop_assert_eq!((field.offset, field.size), (off, size));
    }

    #[test]
    fn proc_counters_parse_or_read_zero(text in "\\PC{0,300}", v in any::<u64>()) {
        let _ = KsmStat::parse(&text);
        let _ = vmstat_in(&text, "cow_ksm");
        let s = KsmStat::parse(&format!("{text}\nksm_merging_pages {}\n", v >> 1));
        if !text.contains("ksm_merging_pages") {
            prop_assert_eq!(s.merging_pages, (v >> 1) as i64);
        }
        prop_assert_eq!(vmstat_in(&format!("cow_ksm {v}\n"), "cow_ksm"), Some(v));
    }

    #[test]
    fn configs_parse_or_explain(text in "\\PC{0,300}") {
        if let Err(e) = FileConfig::parse(&text) {
            prop_assert!(!e.is_empty());
        }
        let _ = text.parse::<Listen>();
    }
}
