//! Fingerprints must equal what `ssh-keygen -lf` prints, for every key type the platform takes.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect
//!
//! Keys are made by ssh-keygen at test time; the FIDO keys (which need an authenticator
//! to generate) are fixtures built from valid curve points, and are still fingerprinted
//! by the live ssh-keygen here.

use std::path::Path;
use std::process::Command;

use vmedge_model::{KeyAlgorithm, SshKey};

fn ssh_keygen_fingerprint(pub_file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_file)
        .output()
        .expect("ssh-keygen must be installed (scripts/test installs openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "256 SHA256:abc... comment (ED25519)"
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn check(pub_file: &Path, want: KeyAlgorithm) {
    let text = std::fs::read_to_string(pub_file).unwrap();
    let key = SshKey::parse_openssh("k", &text).unwrap();
    assert_eq!(key.algorithm, want, "{}", pub_file.display());
    assert_eq!(
        key.fingerprint.to_string(),
        ssh_keygen_fingerprint(pub_file),
        "{}",
        pub_file.display()
    );
    // The comment is stripped, the rest kept as given.
    let mut words = text.split_whitespace();
    assert_eq!(
        key.public_key,
        format!("{} {}", words.next().unwrap(), words.next().unwrap())
    );
    // The fingerprint text parses back to the same value.
    assert_eq!(
        key.fingerprint
            .to_string()
            .parse::<vmedge_model::Fingerprint>()
            .unwrap(),
        key.fingerprint
    );
}

#[test]
fn generated_keys_match_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], KeyAlgorithm)] = &[
        ("ed25519", &["-t", "ed25519"], KeyAlgorithm::Ed25519),
        (
            "rsa2048",
            &["-t", "rsa", "-b", "2048"],
            KeyAlgorithm::Rsa { bits: 2048 },
        ),
        (
            "rsa3072",
            &["-t", "rsa", "-b", "3072"],
            KeyAlgorithm::Rsa { bits: 3072 },
        ),
        (
            "p256",
            &["-t", "ecdsa", "-b", "256"],
            KeyAlgorithm::EcdsaP256,
        ),
        (
            "p384",
            &["-t", "ecdsa", "-b", "384"],
            KeyAlgorithm::EcdsaP384,
        ),
        (
            "p521",
            &["-t", "ecdsa", "-b", "521"],
            KeyAlgorithm::EcdsaP521,
        ),
    ];
    for (name, args, want) in cases {
        let file = dir.path().join(name);
        let status = Command::new("ssh-keygen")
            .args(*args)
            .args(["-q", "-N", "", "-C", "someone@laptop", "-f"])
            .arg(&file)
            .status()
            .expect("ssh-keygen must be installed (scripts/test installs openssh-client)");
        assert!(status.success());
        check(&file.with_extension("pub"), *want);
    }
}

#[test]
fn fido_keys_match_ssh_keygen() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    check(&data.join("sk-ed25519.pub"), KeyAlgorithm::SkEd25519);
    check(&data.join("sk-ecdsa.pub"), KeyAlgorithm::SkEcdsaP256);
}

#[test]
fn refused_keys_say_why() {
    let dss = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAOqi0aSCCcBOGDkNnfEeWPNjoO0uOtaUm3yZdLa2/jDIoNQwb5hgefl/5hQXvPOvWLHoNaPfV2R3v4eYwlA0Ho2jgAHZL1xhk2/Qfd7uw1Y9IOXMx9TXMZcC6lnBAPmyVhuE/hVbx3PNmEsg0LtmqRaEg28n7oJR4swyq5Mt5VfC";
    assert!(
        matches!(SshKey::parse_openssh("", dss), Err(vmedge_model::SshKeyError::Unsupported(k)) if k == "ssh-dss")
    );
    assert!(matches!(
        SshKey::parse_openssh("", "ssh-ed25519 AAAA"),
        Err(vmedge_model::SshKeyError::Malformed(_))
    ));
    assert!(matches!(
        SshKey::parse_openssh("", "not a key"),
        Err(vmedge_model::SshKeyError::Malformed(_))
    ));
    let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    assert!(
        SshKey::parse_openssh("", &format!("{ed} a\n")).is_ok(),
        "one trailing newline is fine"
    );
    assert_eq!(
        SshKey::parse_openssh("", &format!("{ed}\n{ed}")),
        Err(vmedge_model::SshKeyError::Newline)
    );
}
