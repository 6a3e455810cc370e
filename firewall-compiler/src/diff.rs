//! What an apply would change: the live table against the desired one, both as nft lists
//! them (so both sides are in nft's own normal form), as a unified diff.
//!
//! Counter values and the elements of fqdn sets (filled by the DNS gate, not by a sync)
//! are masked: they differ between any two listings and no apply touches them.

use similar::TextDiff;

use crate::names;

/// `nft list table` text with counters and fqdn set elements masked.
pub fn normalize_listing(text: &str) -> String {
    let mut out = String::new();
    let mut in_fqdn_set = false;
    let mut skipping_elements = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("set ") {
            in_fqdn_set = rest.starts_with("fq_");
        }
        if skipping_elements {
            // Elements continue until the line that closes the list.
            if trimmed.ends_with('}') {
                skipping_elements = false;
            }
            continue;
        }
        if in_fqdn_set && trimmed.starts_with("elements = {") {
            // Dropped, not replaced: a set the DNS gate has not filled lists no elements line.
            skipping_elements = !trimmed.ends_with('}');
            continue;
        }
        out.push_str(&mask_counters(line));
        out.push('\n');
    }
    out
}

/// `counter packets 12 bytes 3456` -> `counter`.
fn mask_counters(line: &str) -> String {
    let mut words: Vec<&str> = Vec::new();
    let mut iter = line.split(' ').peekable();
    while let Some(word) = iter.next() {
        words.push(word);
        if word.trim_start() == "counter" && iter.peek() == Some(&"packets") {
            // packets N bytes M
            for _ in 0..4 {
                iter.next();
            }
        }
    }
    words.join(" ")
}

/// A unified diff from the live listing to the desired one; empty when they agree.
pub fn diff_listings(live: &str, desired: &str) -> String {
    let (live, desired) = (normalize_listing(live), normalize_listing(desired));
    if live == desired {
        return String::new();
    }
    TextDiff::from_lines(&live, &desired)
        .unified_diff()
        .context_radius(2)
        .header(&format!("live table inet {}", names::TABLE), "after apply")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "table inet vmedge {\n\tset fq_x_4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t\telements = { 1.2.3.4 expires 10s,\n\t\t\t     5.6.7.8 expires 20s }\n\t}\n\tchain in_x {\n\t\tip6 saddr @s return\n\t\tcounter packets 3 bytes 180 drop comment \"default deny\"\n\t}\n}\n";

    #[test]
    fn counters_and_dns_filled_elements_do_not_count() {
        let desired = LIVE
            .replace("counter packets 3 bytes 180", "counter packets 0 bytes 0")
            .replace(
                "\t\telements = { 1.2.3.4 expires 10s,\n\t\t\t     5.6.7.8 expires 20s }\n",
                "",
            );
        // The desired side has no elements at all and fresh counters: no difference.
        assert_eq!(diff_listings(LIVE, &desired), "");
        assert_eq!(diff_listings(LIVE, LIVE), "");
    }

    #[test]
    fn a_rule_change_shows_as_a_diff() {
        let desired = LIVE.replace("ip6 saddr @s return", "ip6 saddr @s drop");
        let diff = diff_listings(LIVE, &desired);
        assert!(
            diff.contains("-\t\tip6 saddr @s return") && diff.contains("+\t\tip6 saddr @s drop"),
            "{diff}"
        );
    }
}
