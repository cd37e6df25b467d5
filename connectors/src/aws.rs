//! Connecting to AWS services (Kinesis, DynamoDB, S3): region, endpoint override (for emulators),
//! credentials from aws-config's default chain unless static ones are given.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use shardflow_core::redact::without_user_info;

/// Where and how to reach AWS.
#[derive(Clone, Default)]
pub struct AwsConfig {
    region: Option<String>,
    endpoint: Option<String>,
    static_credentials: Option<(String, String)>,
    path_style: bool,
}

impl std::fmt::Debug for AwsConfig {
    // Secrets never reach logs: only whether static credentials are set.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_deref().map(without_user_info))
            .field("path_style", &self.path_style)
            .field(
                "static_credentials",
                &self.static_credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Region used with emulators, which accept any.
const EMULATOR_REGION: &str = "us-east-1";

impl AwsConfig {
    /// The default chain: region and credentials from the environment, profile or instance.
    pub fn new() -> Self {
        Self::default()
    }

    /// An emulator at `endpoint` (plain HTTP on loopback), with fixed test credentials and
    /// path-style S3 addressing.
    pub fn emulator(endpoint: impl Into<String>) -> Self {
        Self::new()
            .region(EMULATOR_REGION)
            .endpoint(endpoint)
            .static_credentials("shardflow-test", "shardflow-test")
            .path_style(true)
    }

    /// Addresses S3 buckets in the path (`endpoint/bucket/key`) instead of the host name, as
    /// S3-compatible stores and emulators often need.
    pub fn path_style(mut self, path_style: bool) -> Self {
        self.path_style = path_style;
        self
    }

    /// The AWS region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sends requests to `endpoint` instead of the regional one.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Uses these credentials instead of the default chain.
    pub fn static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        self.static_credentials = Some((access_key_id.into(), secret.into()));
        self
    }

    /// The shared SDK configuration: region and credentials.
    async fn shared(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some((id, secret)) = &self.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                None,
                None,
                "shardflow-static",
            ));
        }
        loader.load().await
    }

    /// A Kinesis client.
    #[cfg(feature = "kinesis")]
    pub async fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        let mut builder = aws_sdk_kinesis::config::Builder::from(&self.shared().await);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_kinesis::Client::from_conf(builder.build())
    }

    /// A DynamoDB client.
    #[cfg(feature = "dynamodb")]
    pub async fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        let mut builder = aws_sdk_dynamodb::config::Builder::from(&self.shared().await);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_dynamodb::Client::from_conf(builder.build())
    }

    /// An S3 client.
    #[cfg(feature = "s3")]
    pub async fn s3_client(&self) -> aws_sdk_s3::Client {
        let mut builder = aws_sdk_s3::config::Builder::from(&self.shared().await)
            .force_path_style(self.path_style);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_s3::Client::from_conf(builder.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_secrets() {
        let config = AwsConfig::emulator("http://127.0.0.1:1").static_credentials("AKIA", "s3cr3t");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("AKIA"),
            "{shown}"
        );
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn endpoints_are_shown_without_user_info() {
        let config = AwsConfig::emulator("http://admin:hunter2@10.0.0.1:4566/path?x=1");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("admin"),
            "{shown}"
        );
        assert!(
            shown.contains("http://<redacted>@10.0.0.1:4566/path?x=1"),
            "{shown}"
        );
        // The rule itself is tested where it lives (`core::redact`).
    }
}
