"""LLaMA-Factory options eqakit knows of but does not implement.

A config that sets one of these gets an error saying so, never a silent ignore: a user who asked
for DoRA must not get plain LoRA without noticing. Keys whose refusal would surprise a user (they
look harmless, or LLaMA-Factory's own examples set them) carry the reason in `REASONS`.
"""

LLAMA_FACTORY_UNSUPPORTED: frozenset[str] = frozenset(
    """
    adapter_folder apollo_rank apollo_scale apollo_target apollo_update_interval
    audio_sampling_rate badam_mode badam_start_block badam_switch_mode badam_switch_interval
    badam_update_ratio block_diag_attn booster buffer_size crop_to_patches data_shared_file_system
    disable_shuffling double_quantization
    enable_liger_kernel eval_num_beams eval_on_each_dataset export_hub_model_id export_quantization_bit
    export_quantization_dataset export_quantization_maxlen export_quantization_nsamples
    galore_layerwise galore_proj_type
    galore_rank galore_scale galore_target galore_update_interval hf_hub_token ignore_pad_token_for_loss
    image_do_pan_and_scan include_effective_tokens_per_second interleave_probs kto_chosen_weight
    kto_rejected_weight ld_alpha length_penalty loraplus_lr_embedding low_cpu_mem_usage max_length mix_strategy
    mixture_of_depths moe_aux_loss_coef ms_hub_token neat_packing new_special_tokens offload_folder
    om_hub_token overwrite_cache pissa_convert pissa_init pissa_iter ppo_buffer_size ppo_epochs ppo_score_norm ppo_target
    ppo_whiten_rewards pref_bco_weight print_param_status quantization_device_map
    quantization_type ref_model ref_model_adapters ref_model_quantization_bit resize_vocab reward_model
    reward_model_adapters reward_model_quantization_bit reward_model_type rope_scaling sglang_config
    sglang_maxlen sglang_mem_fraction sglang_tp_size shift_attn split_special_tokens streaming
    swanlab_api_key swanlab_mode swanlab_project swanlab_run_name swanlab_workspace tokenized_path tool_format
    train_from_scratch train_mm_proj_only upcast_layernorm upcast_lmhead_output use_adam_mini use_apollo
    use_audio_in_video use_badam use_cache use_galore use_kt use_llama_pro use_mca use_muon
    use_swanlab use_unsloth use_unsloth_gc
    """.split()
)

REASONS: dict[str, str] = {
    "overwrite_cache": "eqakit keeps no cache of encoded datasets: every run plans its samples afresh",
    "max_length": (
        "LLaMA-Factory uses it only when max_new_tokens <= 0; eqakit bounds every reply by max_new_tokens"
    ),
    "length_penalty": "it scores beams in beam search; eqakit decodes with num_beams 1",
    "loraplus_lr_embedding": (
        "it sets the learning rate of LoRA on embedding layers, and eqakit's lora_target names linear layers only"
    ),
    "pissa_init": (
        "PiSSA rewrites the base weights, so its adapter only fits a base eqakit does not save; use plain LoRA"
    ),
    "pissa_iter": "it tunes PiSSA's initialisation (pissa_init), which eqakit does not run",
    "pissa_convert": "it converts a PiSSA adapter (pissa_init), which eqakit does not train",
    "pref_bco_weight": "eqakit's DPO has no BCO term; pref_loss sigmoid, orpo and simpo",
    "ref_model": "eqakit's DPO reference is the base model: LoRA with the adapter off, full or freeze a frozen copy",
}
"""Why eqakit refuses a key, where the bare refusal would leave a user guessing."""
