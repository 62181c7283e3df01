//! One spelling per name. An enum whose names a user types or a file stores derives
//! `clap::ValueEnum` (and `serde`, where it is stored, under the same case rule); its
//! `Display` and `FromStr` are made here from the clap derive, for every such enum, and
//! the test below holds serde to the same names. Nothing else writes a name table.

/// `Display` (the clap name) and `FromStr` (that name, or the error `unknown WHAT 'x'`)
/// for `clap::ValueEnum` types.
macro_rules! names_from_value_enum {
    ($($(#[$cfg:meta])* $t:ty => $what:literal),* $(,)?) => {$(
        $(#[$cfg])*
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let value = clap::ValueEnum::to_possible_value(self)
                    .expect("no variant is skipped, so each has a name");
                f.write_str(value.get_name())
            }
        }

        $(#[$cfg])*
        impl std::str::FromStr for $t {
            type Err = anyhow::Error;

            fn from_str(s: &str) -> anyhow::Result<$t> {
                <$t as clap::ValueEnum>::from_str(s, false)
                    .map_err(|_| anyhow::anyhow!("unknown {} '{s}'", $what))
            }
        }
    )*};
}

names_from_value_enum! {
    crate::runtime::LoadingPolicy => "loading policy",
    crate::runtime::SchedulingPolicy => "scheduling policy",
    crate::runtime::LayerCache => "layer cache",
    crate::runtime::Eviction => "eviction",
    crate::model::ColorOrder => "color order",
    crate::model::ResizeMode => "resize mode",
    #[cfg(feature = "bench")]
    crate::bench::child::Status => "status",
    #[cfg(feature = "bench")]
    crate::bench::report::LimitMode => "limit mode",
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;
    use serde::{Serialize, de::DeserializeOwned};
    use std::fmt::{Debug, Display};
    use std::str::FromStr;

    /// Every variant prints as its clap name and parses back from it.
    fn round_trip<T>()
    where
        T: ValueEnum + Display + FromStr<Err = anyhow::Error> + PartialEq + Debug,
    {
        for v in T::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(v.to_string(), name);
            assert_eq!(&name.parse::<T>().unwrap(), v);
        }
        assert!("no-such-name".parse::<T>().is_err());
    }

    /// … and serde writes and reads the same name.
    fn serde_agrees<T>()
    where
        T: ValueEnum + Display + Serialize + DeserializeOwned + PartialEq + Debug,
    {
        for v in T::value_variants() {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json, serde_json::Value::String(v.to_string()), "{v:?}");
            assert_eq!(&serde_json::from_value::<T>(json).unwrap(), v);
        }
    }

    #[test]
    fn one_name_each() {
        use crate::model::{ColorOrder, ResizeMode};
        use crate::runtime::{Eviction, LayerCache, LoadingPolicy, SchedulingPolicy};
        round_trip::<LoadingPolicy>();
        serde_agrees::<LoadingPolicy>();
        round_trip::<SchedulingPolicy>();
        serde_agrees::<SchedulingPolicy>();
        round_trip::<LayerCache>();
        serde_agrees::<LayerCache>();
        round_trip::<Eviction>();
        serde_agrees::<Eviction>();
        round_trip::<ColorOrder>();
        serde_agrees::<ColorOrder>();
        round_trip::<ResizeMode>();
        serde_agrees::<ResizeMode>();
        #[cfg(feature = "bench")]
        {
            round_trip::<crate::bench::child::Status>();
            round_trip::<crate::bench::report::LimitMode>();
        }
        assert_eq!(LoadingPolicy::DeepEye.to_string(), "deepeye");
        assert_eq!(Eviction::CostPerByte.to_string(), "cost-per-byte");
    }
}
