//! Property tests that feed the token parser and the policy parser hostile
//! input: whatever comes in, they answer with an error, never a panic. Bounded
//! case counts keep them inside `scripts/test`.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use proptest::prelude::*;

use crate::{
    dev::TokenSpec,
    identity::tests::{Fixture, fixture},
    policy::Policy,
    secret::Secret,
};

/// Runs a future to completion on a fresh current-thread runtime.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(future)
}

const POLICY: &str = include_str!("../../tests/golden/policy/good.yaml");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn tokens_of_arbitrary_text_are_refused(text in ".{0,600}") {
        let Fixture { verifier, .. } = fixture();
        prop_assert!(block_on(verifier.verify_at(&Secret::from(text), 1_800_000_000)).is_err());
    }

    #[test]
    fn tokens_of_arbitrary_parts_are_refused(
        header in proptest::collection::vec(any::<u8>(), 0..200),
        claims in proptest::collection::vec(any::<u8>(), 0..400),
        sig in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let Fixture { verifier, .. } = fixture();
        let token = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims), URL_SAFE_NO_PAD.encode(sig));
        prop_assert!(block_on(verifier.verify_at(&Secret::from(token), 1_800_000_000)).is_err());
    }

    #[test]
    fn a_flipped_byte_in_a_valid_token_is_refused(index in 0usize..2000, byte in any::<u8>()) {
        let Fixture { signer, verifier, _dir } = fixture();
        let mut spec = TokenSpec::new("shop", "orders");
        spec.issued_at = Some(1_800_000_000 - 60);
        let mut token = signer.mint(&spec).into_bytes();
        let i = index % token.len();
        prop_assume!(token[i] != byte);
        token[i] = byte;
        let Ok(text) = String::from_utf8(token) else { return Ok(()); };
        prop_assert!(block_on(verifier.verify_at(&Secret::from(text), 1_800_000_000)).is_err());
    }

    #[test]
    fn policies_of_arbitrary_text_never_panic(text in "(?s).{0,400}") {
        let _ = Policy::parse(&text, "fuzz.yaml");
    }

    #[test]
    fn mutated_policies_never_panic(edits in proptest::collection::vec((0usize..2000, any::<char>()), 1..8)) {
        let mut chars: Vec<char> = POLICY.chars().collect();
        for (index, c) in edits {
            let i = index % chars.len();
            chars[i] = c;
        }
        let text: String = chars.into_iter().collect();
        if let Err(error) = Policy::parse(&text, "fuzz.yaml") {
            prop_assert!(!error.problems.is_empty());
        }
    }
}
