"""A one-layer LLaMA and a DeepSpeed engine around it at a ZeRO stage (the one-process workers here)."""
import deepspeed
import transformers


def tiny_llama() -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def tiny_engine(model, stage: int, accumulation: int = 1):
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation,
          "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    return engine
