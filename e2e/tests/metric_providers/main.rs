//! The metric providers of `MetricTemplate` other than Prometheus, one module each, in one test binary (one link
//! instead of five). Real servers where Debian packages them (graphite-web, influxd), documented request and
//! response shapes on loopback stand-ins for hosted APIs (New Relic, Entra ID, CloudWatch).

mod azure_monitor;
mod cloudwatch;
mod graphite;
mod influxdb;
mod newrelic;
