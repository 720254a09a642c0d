"""Tiny random diffusers pipelines for the tests of `edm2.external`, built from configs (never downloaded):
an IF-style stage I (pixels, T5, ε with learned variance), its stage II, a v-prediction Stable Diffusion model
and an SD3-style rectified-flow model, each saved with `save_pretrained` into a folder."""

import torch

WORDS = ['<pad>', '</s>', '<unk>', 'a', 'cat', 'dog', 'red', 'blue', 'photo', 'of', 'bad']


def tokenizer(max_length=8):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='</s>', unk_token='<unk>',
                                   model_max_length=max_length)


def t5(width=16):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=width, d_kv=4, d_ff=32, num_layers=1, num_heads=2))


def clip(width, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                            projection_dim=projection or width, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def if_unet(in_channels=3, resolution=8, stage2=False, width=8):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels * (2 if stage2 else 1), out_channels=2 * in_channels,
        layers_per_block=1, block_out_channels=(width, 2 * width),
        down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
        up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
        mid_block_type='UNetMidBlock2DSimpleCrossAttn', cross_attention_dim=2 * width, attention_head_dim=4,
        norm_num_groups=4, encoder_hid_dim=16, encoder_hid_dim_type='text_proj', addition_embed_type='text',
        addition_embed_type_num_heads=2, class_embed_type='timestep' if stage2 else None,
        resnet_time_scale_shift='scale_shift')


def if_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_schedule='squaredcos_cap_v2', variance_type='learned_range', thresholding=True,
                         clip_sample=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.95)


def save_if(folder, seed=0, width=8):
    from diffusers import IFPipeline
    torch.manual_seed(seed)
    IFPipeline(tokenizer=tokenizer(), text_encoder=t5(), unet=if_unet(width=width), scheduler=if_scheduler(),
               safety_checker=None, feature_extractor=None, watermarker=None,
               requires_safety_checker=False).save_pretrained(folder)
    return folder


def save_if_stage2(folder, seed=5):
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline
    torch.manual_seed(seed)
    IFSuperResolutionPipeline(tokenizer=tokenizer(), text_encoder=t5(), unet=if_unet(resolution=16, stage2=True),
                              scheduler=if_scheduler(), image_noising_scheduler=DDPMScheduler(),
                              safety_checker=None, feature_extractor=None, watermarker=None,
                              requires_safety_checker=False).save_pretrained(folder)
    return folder


def vae(latent_channels=4, shift=None, scale=1.5):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
                         layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=scale,
                         shift_factor=shift)


def save_sd(folder, seed=1, prediction='v_prediction', resolution=8):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    StableDiffusionPipeline(vae=vae(), text_encoder=clip(16), tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def save_sd3(folder, seed=2, layers=1, resolution=8):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=resolution, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=layers, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=32,
                                        pos_embed_max_size=16)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=vae(shift=0.1), text_encoder=clip(8, 16), tokenizer=tokenizer(),
                             text_encoder_2=clip(8, 16), tokenizer_2=tokenizer(), text_encoder_3=t5(),
                             tokenizer_3=tokenizer(12)).save_pretrained(folder)
    return folder


def save_upscaler(folder, seed=6):
    """A tiny StableDiffusionUpscalePipeline (the x4 upscaler's structure; its one-block VAE keeps the size)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, num_class_embeds=351)
    StableDiffusionUpscalePipeline(vae=vae(scale=0.08333), text_encoder=clip(16), tokenizer=tokenizer(), unet=unet,
                                   low_res_scheduler=DDPMScheduler(),
                                   scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                                   max_noise_level=350).save_pretrained(folder)
    return folder
