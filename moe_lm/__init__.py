"""lineinspect.moe_lm"""
