"""Deployment: compose, Dockerfile, nginx (and the compose topology run locally), Prometheus
and Grafana configuration."""
