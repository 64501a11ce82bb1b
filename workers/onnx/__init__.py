"""ONNX export, its parity check, and running an export on ONNX Runtime."""
