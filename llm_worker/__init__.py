"""llm_worker: owns a model and streams its output over gRPC."""
